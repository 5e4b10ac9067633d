//! `kubectl wgmesh`: the mesh's health on one screen, the mesh as a picture, external peers'
//! configurations, key rotations followed to the end, and a doctor.
//!
//! The modules here are pure (what to show, what is wrong, what to draw); `main.rs` reads
//! the cluster and writes.

pub mod doctor;
pub mod graph;
pub mod health;
pub mod peer_config;
pub mod prom;
pub mod render;
pub mod rotate;
