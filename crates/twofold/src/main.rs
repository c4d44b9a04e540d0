//! The `twofold` command.

fn main() {}
