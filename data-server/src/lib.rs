//! The data tier: slot storage, ordering of publisher changes, change notification
