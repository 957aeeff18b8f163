//! One task per core NATS subscription that is not a room: the control and
//! presence subjects.

use std::future::Future;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs `each` on every message of `sub`, one at a time, on `tasks` until
/// `stop` is cancelled or the subscription ends (the client closed).
pub fn follow<F, Fut>(tasks: &TaskTracker, stop: &CancellationToken, mut sub: async_nats::Subscriber, mut each: F)
where
    F: FnMut(async_nats::Message) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let stop = stop.clone();
    tasks.spawn(async move {
        loop {
            let msg = tokio::select! {
                m = sub.next() => m,
                () = stop.cancelled() => return,
            };
            let Some(msg) = msg else { return };
            each(msg).await;
        }
    });
}
