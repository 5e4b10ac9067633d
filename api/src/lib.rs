//! wgmesh API types.
