//! placeholder, replaced by the event fixture tests
