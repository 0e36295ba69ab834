//! A reply the filter sends itself (status, headers, body), independent of the host.

/// A reply the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The value of header `name` (lowercase), if the reply has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Adds `x-request-id` unless the reply already carries one.
    pub fn with_request_id(mut self, request_id: &str) -> HttpReply {
        if self.header("x-request-id").is_none() {
            self.headers
                .push(("x-request-id".to_string(), request_id.to_string()));
        }
        self
    }
}
