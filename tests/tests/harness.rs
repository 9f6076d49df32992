//! Self-tests of the real-component harness, all against the real etcd, docker-registry and
//! skopeo; one test binary so the workspace links it once.

mod harness {
    pub mod components;
    pub mod fault;
    pub mod images;
}
