//! placeholder, replaced by the macro UI tests
