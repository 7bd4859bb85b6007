//! Coalescing small requests into one round trip: callers each submit one item (an ack, a
//! result to store) and wait for its answer; a single background task sends whatever has
//! queued up as one batch, so under load a batch holds everything that arrived while the
//! previous one was in flight, and with no load an item goes out at once. Used by the Redis
//! broker (acks) and backend (result writes).
//!
//! Not for: deciding what a batch does (the `run` function given to [`Coalescer::new`]).

use futures::future::BoxFuture;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

type Reply<R> = oneshot::Sender<Result<R, Arc<str>>>;

/// A handle on one coalescing loop.
pub(crate) struct Coalescer<T, R> {
    tx: mpsc::UnboundedSender<(T, Reply<R>)>,
}

impl<T, R> std::fmt::Debug for Coalescer<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// Starts the loop: `run` gets up to `max_batch` items and returns one answer per item, in
    /// order (or one error for all). The loop ends when every handle is dropped.
    pub(crate) fn new<F>(max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<T>) -> BoxFuture<'static, Result<Vec<R>, String>> + Send + Sync + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(T, Reply<R>)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut items = Vec::with_capacity(16);
                let mut replies = Vec::with_capacity(16);
                items.push(first.0);
                replies.push(first.1);
                while items.len() < max_batch {
                    match rx.try_recv() {
                        Ok((item, reply)) => {
                            items.push(item);
                            replies.push(reply);
                        }
                        Err(_) => break,
                    }
                }
                let n = items.len();
                match run(items).await {
                    Ok(answers) if answers.len() == n => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Ok(answers) => {
                        let e: Arc<str> = format!("a batch of {n} got {} answers", answers.len()).into();
                        replies.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
                    }
                    Err(e) => {
                        let e: Arc<str> = e.into();
                        replies.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
                    }
                }
            }
        });
        Coalescer { tx }
    }

    /// Submits one item and waits for its answer.
    pub(crate) async fn call(&self, item: T) -> Result<R, Arc<str>> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).map_err(|_| Arc::<str>::from("the batching loop has stopped"))?;
        answer.await.map_err(|_| Arc::<str>::from("the batching loop dropped the request"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn items_submitted_together_go_out_in_few_batches_and_get_their_own_answers() {
        let batches = Arc::new(AtomicUsize::new(0));
        let seen = batches.clone();
        let c = Arc::new(Coalescer::new(64, move |items: Vec<u32>| {
            seen.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                tokio::task::yield_now().await;
                Ok(items.into_iter().map(|i| i * 2).collect())
            })
        }));
        let calls: Vec<_> = (0..200u32)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.call(i).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u32 * 2);
        }
        assert!(batches.load(Ordering::SeqCst) < 200, "coalesced: {} batches", batches.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn an_error_reaches_every_caller_of_its_batch() {
        let c = Coalescer::new(8, |_items: Vec<u32>| Box::pin(async { Err::<Vec<u32>, _>("down".to_owned()) }));
        assert_eq!(&*c.call(1).await.unwrap_err(), "down");
    }
}
