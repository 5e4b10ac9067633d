//! Pure wgmesh logic.
