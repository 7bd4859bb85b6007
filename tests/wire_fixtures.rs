//! placeholder, replaced by the fixture tests
