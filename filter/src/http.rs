//! The HTTP context: each callback forwards to the request's `Flow` in filter/core.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action as WasmAction, BufferType};
use realtime_filter_core::{relay, Action, Flow};

use crate::host::{self, Envoy};
use crate::Runtime;
use std::rc::Rc;

pub struct Http {
    rt: Rc<Runtime>,
    flow: Flow,
}

impl Http {
    pub fn new(rt: Rc<Runtime>) -> Self {
        let flow = Flow::new(Rc::clone(&rt.config));
        Http { rt, flow }
    }

    /// The request's flow and the host it acts through.
    fn parts(&mut self) -> (&mut Flow, Envoy<'_>) {
        let envoy = Envoy::new(&self.rt.metrics);
        (&mut self.flow, envoy)
    }
}

fn action(a: Action) -> WasmAction {
    match a {
        Action::Continue => WasmAction::Continue,
        Action::Pause => WasmAction::Pause,
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        // Status and size first; only read the body of a successful call.
        let message = hostcalls::get_grpc_status().ok().and_then(|(_, m)| m);
        let body = if status_code == relay::grpc::OK && response_size > 0 {
            host::buffer(BufferType::GrpcReceiveBuffer, response_size)
        } else {
            None
        };
        let (flow, mut envoy) = self.parts();
        flow.on_grpc_response(
            &mut envoy,
            token_id,
            status_code,
            message.as_deref(),
            body.as_deref(),
        );
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> WasmAction {
        let (flow, mut envoy) = self.parts();
        action(flow.on_headers(&mut envoy, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> WasmAction {
        let (flow, mut envoy) = self.parts();
        action(flow.on_body(&mut envoy, body_size, end_of_stream))
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> WasmAction {
        let (flow, mut envoy) = self.parts();
        action(flow.on_trailers(&mut envoy))
    }

    fn on_log(&mut self) {
        let (flow, mut envoy) = self.parts();
        flow.on_done(&mut envoy);
    }
}
