//! Test harness: isolated daemons on temp dirs, the test-agent image, Docker helpers.
