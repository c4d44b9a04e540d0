//! Twofold data plane.
