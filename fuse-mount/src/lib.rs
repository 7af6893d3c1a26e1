//! fuse-mount: placeholder until its issue lands.
