//! The SDK's own I/O threads.
//!
//! Every QUIC endpoint the SDK creates runs its socket, its connections and their timers here, on
//! a small Tokio runtime of the SDK's own (threads named `roster-client-io`), and so do the tasks
//! that read pushes, apply them, and watch the connection's liveness. The application's runtime
//! only runs what the application awaits. An application that keeps its own threads busy — a
//! consumer stuck in a long computation, a runtime saturated by work — therefore cannot starve
//! the keep-alives, leave pushes unread, or make a healthy session server look dead.
//!
//! The runtime starts with the first client of the process and lives as long as the process: its
//! threads sleep when no client is left. Endpoints passed in by the application
//! ([`crate::Client::connect_on`]) run where they were created; make them with [`endpoint`] to
//! give them the same footing.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use quinn::{AsyncTimer, AsyncUdpSocket, Endpoint, Runtime, TokioRuntime};
use roster_common::{Error, Result, quic};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Threads of the SDK's runtime: two, or one on a single-core machine.
const IO_THREADS: usize = 2;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(IO_THREADS);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("roster-client-io")
            .enable_all()
            .build()
            .expect("the SDK's I/O runtime starts")
    })
}

/// The SDK runtime's handle.
pub(crate) fn handle() -> Handle {
    runtime().handle().clone()
}

/// Runs `future` on the SDK's runtime.
pub(crate) fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(future)
}

/// A client endpoint bound to `local` (port 0 for any) whose socket, connections and timers run on
/// the SDK's own threads. Several clients may share one ([`crate::Client::connect_on`]): one UDP
/// socket for all of them.
pub fn endpoint(local: SocketAddr) -> Result<Endpoint> {
    let socket = quic::bind_udp(local)?;
    let runtime = Arc::new(IoRuntime(handle()));
    quic::endpoint_on(socket, None, runtime)
        .map_err(|e| Error::InvalidArgument(format!("cannot start a client endpoint: {e}")))
}

/// quinn's Tokio runtime, pinned to the SDK's runtime whichever thread calls it: quinn spawns a
/// connection's driver from the thread that dials, which may be the application's.
#[derive(Debug)]
struct IoRuntime(Handle);

impl Runtime for IoRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _inside = self.0.enter();
        TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
        let _inside = self.0.enter();
        TokioRuntime.wrap_udp_socket(socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection dialed from another runtime still runs on the SDK's threads.
    #[tokio::test(flavor = "current_thread")]
    async fn endpoints_run_on_the_sdk_threads() {
        let endpoint = endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let name = spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("roster-client-io"));
        assert!(endpoint.local_addr().unwrap().port() > 0);
    }
}
