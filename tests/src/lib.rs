//! Shared helpers for wgmesh integration tests against a real API server.
