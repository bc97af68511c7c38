//! NBD server for blockguard volumes (see the crate README / docs).
