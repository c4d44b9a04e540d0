//! Twofold control plane.
