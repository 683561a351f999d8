//! The parts of the `postroom` binary that other code reaches: the configuration model and its
//! parser, so the fuzz targets (fuzz/) and the binary parse configuration with the same code.
#![forbid(unsafe_code)]

pub mod config;
