//! The real-component test harness shared by every end-to-end test.
