//! vhdx: placeholder until its issue lands.
