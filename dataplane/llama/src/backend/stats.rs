//! The llama backend's own counters.

/// Counters beyond [`cnse_backend::BackendStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LlamaStats {
    /// Requests sent on a reused keep-alive connection.
    pub reused: u64,
    /// Requests re-sent on a fresh connection after a pooled one was found
    /// closed by the server.
    pub retried: u64,
    /// Times a llama-server was marked down (failure or health check).
    pub evicted: u64,
    /// Times a health check found a down llama-server healthy again.
    pub readmitted: u64,
    pub health_checks: u64,
    pub timeouts: u64,
    /// Streams sent to the server with the longest cached prefix (not
    /// the least-loaded one's choice).
    pub prefix_routed: u64,
    /// Streams with a session key sent to the server the key was pinned
    /// to (`--llama-route session`).
    pub session_routed: u64,
    /// Streams sent again to another server before their first token
    /// (connection refused, 5xx, 429), invisibly to the client.
    pub retried_elsewhere: u64,
    /// Connections opened ahead of requests (spares), for servers that
    /// close after each stream.
    pub spares_opened: u64,
    /// Streams whose server failed after tokens were delivered, continued
    /// on another server from their text so far (`failover`).
    pub failed_over: u64,
    /// Requests that found a spare (connected, or its CONNECT in flight).
    pub spares_taken: u64,
    /// Idle connections (spares or pooled) the server closed while they
    /// waited; each was replaced before a request could use it.
    pub idle_closed: u64,
}
