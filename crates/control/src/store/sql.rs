//! The one seam between the store and its two databases: a statement runner
//! over a SQLite connection or a PostgreSQL client, with one parameter type and
//! one row type.
//!
//! Statements are written once, in the SQL both databases accept, with `?` (or
//! `?N`) placeholders; for PostgreSQL they are rewritten to `$N`. The few places
//! where the dialects differ (locking, notifications, schema) branch on
//! [`Conn::is_postgres`] or live in the backend-specific code in `mod.rs`.

use std::borrow::Cow;
use std::error::Error as StdError;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::{IsNull, ToSql as PgToSql, Type, to_sql_checked};
use rusqlite::types::{ToSqlOutput, ValueRef};

use super::{Result, StoreError};

/// A connection to run statements on: inside a transaction or not.
pub(super) enum Conn<'a, 'b> {
    Lite(&'a rusqlite::Connection),
    Pg(&'a mut postgres::Client),
    PgTx(&'a mut postgres::Transaction<'b>),
}

/// Run `$body` with `$c` bound to the PostgreSQL client or transaction; both
/// have the same query methods.
macro_rules! on_pg {
    ($conn:expr, $c:ident => $body:expr, $lite:ident => $lite_body:expr) => {
        match $conn {
            Conn::Lite($lite) => $lite_body,
            Conn::Pg($c) => $body,
            Conn::PgTx($c) => $body,
        }
    };
}

impl<'b> Conn<'_, 'b> {
    /// The same connection, borrowed for a shorter time.
    pub(super) fn reborrow(&mut self) -> Conn<'_, 'b> {
        match self {
            Conn::Lite(c) => Conn::Lite(c),
            Conn::Pg(c) => Conn::Pg(c),
            Conn::PgTx(c) => Conn::PgTx(c),
        }
    }

    pub(super) fn is_postgres(&self) -> bool {
        !matches!(self, Conn::Lite(_))
    }

    /// Run a statement; returns the number of rows it changed.
    pub(super) fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64> {
        on_pg!(self,
            c => Ok(c.execute(pg_sql(sql).as_ref(), &pg_args(args))?),
            lite => Ok(lite.prepare_cached(sql)?.execute(rusqlite::params_from_iter(args))? as u64))
    }

    /// Run a query and call `each` with its rows in order, one at a time, until
    /// it returns `false`. Returns whether every row was seen.
    pub(super) fn for_each(
        &mut self,
        sql: &str,
        args: &[Value<'_>],
        each: &mut dyn FnMut(&Row<'_, '_>) -> Result<bool>,
    ) -> Result<bool> {
        on_pg!(self,
        c => {
            let sql = pg_sql(sql);
            let mut rows = c.query_raw(sql.as_ref(), pg_args(args))?;
            while let Some(row) = rows.next()? {
                if !each(&Row::Pg(&row))? {
                    return Ok(false);
                }
            }
            Ok(true)
        },
        lite => {
            let mut stmt = lite.prepare_cached(sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
            while let Some(row) = rows.next()? {
                if !each(&Row::Lite(row))? {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// Every row of a query, mapped by `map`.
    pub(super) fn query<T>(
        &mut self,
        sql: &str,
        args: &[Value<'_>],
        mut map: impl FnMut(&Row<'_, '_>) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        self.for_each(sql, args, &mut |row| {
            out.push(map(row)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// The first row of a query, if any, mapped by `map`.
    pub(super) fn query_opt<T>(
        &mut self,
        sql: &str,
        args: &[Value<'_>],
        map: impl FnOnce(&Row<'_, '_>) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut map = Some(map);
        let mut out = None;
        self.for_each(sql, args, &mut |row| {
            if let Some(map) = map.take() {
                out = Some(map(row)?);
            }
            Ok(false)
        })?;
        Ok(out)
    }

    /// The one row a query must return.
    pub(super) fn query_one<T>(
        &mut self,
        sql: &str,
        args: &[Value<'_>],
        map: impl FnOnce(&Row<'_, '_>) -> Result<T>,
    ) -> Result<T> {
        self.query_opt(sql, args, map)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from: {sql}")))
    }
}

/// `?` and `?N` placeholders as PostgreSQL's `$N`. The store's statements never
/// hold a `?` inside a literal.
fn pg_sql(sql: &str) -> Cow<'_, str> {
    if !sql.contains('?') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut next = 0;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '?' {
            out.push(c);
            continue;
        }
        out.push('$');
        if chars.peek().is_some_and(char::is_ascii_digit) {
            while let Some(d) = chars.next_if(char::is_ascii_digit) {
                out.push(d);
            }
        } else {
            next += 1;
            out.push_str(&next.to_string());
        }
    }
    Cow::Owned(out)
}

fn pg_args<'v>(args: &'v [Value<'_>]) -> Vec<&'v (dyn PgToSql + Sync)> {
    args.iter().map(|a| a as &(dyn PgToSql + Sync)).collect()
}

/// A statement parameter, bound the same way on both databases.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    Null,
    Int(i64),
    Bool(bool),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// What can be bound as a [`Value`].
pub(super) trait Arg {
    fn value(&self) -> Value<'_>;
}

impl Arg for str {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl Arg for String {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl Arg for [u8] {
    fn value(&self) -> Value<'_> {
        Value::Bytes(self)
    }
}

impl Arg for Vec<u8> {
    fn value(&self) -> Value<'_> {
        Value::Bytes(self)
    }
}

impl Arg for i64 {
    fn value(&self) -> Value<'_> {
        Value::Int(*self)
    }
}

impl Arg for u32 {
    fn value(&self) -> Value<'_> {
        Value::Int((*self).into())
    }
}

impl Arg for u8 {
    fn value(&self) -> Value<'_> {
        Value::Int((*self).into())
    }
}

impl Arg for bool {
    fn value(&self) -> Value<'_> {
        Value::Bool(*self)
    }
}

impl<T: Arg + ?Sized> Arg for &T {
    fn value(&self) -> Value<'_> {
        (**self).value()
    }
}

impl<T: Arg> Arg for Option<T> {
    fn value(&self) -> Value<'_> {
        self.as_ref().map_or(Value::Null, Arg::value)
    }
}

/// Statement parameters: `args![a, b]` binds `a` and `b` by reference.
macro_rules! args {
    ($($arg:expr),* $(,)?) => {
        &[$($crate::store::sql::Arg::value(&$arg)),*]
    };
}
pub(super) use args;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(v),
            Value::Bool(v) => ValueRef::Integer(v.into()),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Bytes(v) => ValueRef::Blob(v),
        }))
    }
}

impl PgToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match *self {
            Value::Null => Ok(IsNull::Yes),
            // SQLite keeps booleans as integers; a copied row binds one to a
            // PostgreSQL BOOLEAN.
            Value::Int(v) if *ty == Type::BOOL => (v != 0).to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Bool(v) => v.to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Bytes(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        // Checked per value in `to_sql`, against the type of each variant.
        <i64 as PgToSql>::accepts(ty)
            || <bool as PgToSql>::accepts(ty)
            || <&str as PgToSql>::accepts(ty)
            || <&[u8] as PgToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A column's value, owned: what a copied row holds.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Owned {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Arg for Owned {
    fn value(&self) -> Value<'_> {
        match self {
            Owned::Null => Value::Null,
            Owned::Int(v) => Value::Int(*v),
            Owned::Text(v) => Value::Text(v),
            Owned::Bytes(v) => Value::Bytes(v),
        }
    }
}

/// A row of a query's result.
pub(super) enum Row<'r, 's> {
    Lite(&'r rusqlite::Row<'s>),
    Pg(&'r postgres::Row),
}

/// A column type both databases can read.
pub(super) trait Column:
    rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>
{
}

impl<T> Column for T where T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a> {}

impl Row<'_, '_> {
    pub(super) fn get<T: Column>(&self, i: usize) -> Result<T> {
        match self {
            Row::Lite(r) => Ok(r.get(i)?),
            Row::Pg(r) => Ok(r.try_get(i)?),
        }
    }

    /// Any column of a SQLite row, as it is stored.
    pub(super) fn owned(&self, i: usize) -> Result<Owned> {
        let Row::Lite(r) = self else {
            return Err(StoreError::Corrupt(
                "rows are copied from SQLite only".into(),
            ));
        };
        Ok(match r.get_ref(i)? {
            ValueRef::Null => Owned::Null,
            ValueRef::Integer(v) => Owned::Int(v),
            ValueRef::Text(v) => Owned::Text(
                String::from_utf8(v.to_vec())
                    .map_err(|_| StoreError::Corrupt("text that is not UTF-8".into()))?,
            ),
            ValueRef::Blob(v) => Owned::Bytes(v.to_vec()),
            ValueRef::Real(_) => return Err(StoreError::Corrupt("unexpected REAL".into())),
        })
    }

    /// An integer column that must fit `T`.
    pub(super) fn int<T: TryFrom<i64>>(&self, i: usize) -> Result<T> {
        let v: i64 = self.get(i)?;
        T::try_from(v).map_err(|_| StoreError::Corrupt(format!("integer {v} out of range")))
    }

    /// A nullable integer column that must fit `T`.
    pub(super) fn opt_int<T: TryFrom<i64>>(&self, i: usize) -> Result<Option<T>> {
        let v: Option<i64> = self.get(i)?;
        v.map(|v| {
            T::try_from(v).map_err(|_| StoreError::Corrupt(format!("integer {v} out of range")))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::pg_sql;

    #[test]
    fn placeholders_become_numbered() {
        let cases = [
            ("SELECT 1", "SELECT 1"),
            ("a = ? AND b = ?", "a = $1 AND b = $2"),
            (
                "a = ?1 OR ?1 IS NULL AND c = ?2",
                "a = $1 OR $1 IS NULL AND c = $2",
            ),
            ("LIMIT ?", "LIMIT $1"),
        ];
        for (sql, want) in cases {
            assert_eq!(pg_sql(sql), want, "{sql}");
        }
    }
}
