//! End-to-end tests against real services (see `tests/src/lib.rs` for the harness). Run them
//! through `./tests/run`, which starts RabbitMQ and provides s3s-fs and promtool.

mod campaign;
mod cli;
mod cluster;
mod container;
mod s3_faults;
mod safety;
mod samplers;
mod upstream;
mod worker;
