"""IPC between the host and its sandboxes: messages, sealed memfds, shared buffers."""
