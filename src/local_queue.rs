//! A queue between two parties on one thread that wakes the one reading it: the ClientSession
//! actor telling its relay loop about a Kill or a delivered cancel.
//!
//! The relay checks it on every wake-up, so it must cost next to nothing when empty. A tokio
//! mpsc channel is built for threads and paid atomic operations on each of those checks;
//! this is a `RefCell`'d queue and a waker.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Inner<T> {
    items: VecDeque<T>,
    reader: Option<Waker>,
}

/// The writing end; clone it freely on the same thread.
pub struct LocalSender<T>(Rc<RefCell<Inner<T>>>);

/// The reading end.
pub struct LocalReceiver<T>(Rc<RefCell<Inner<T>>>);

pub fn local_queue<T>() -> (LocalSender<T>, LocalReceiver<T>) {
    let inner = Rc::new(RefCell::new(Inner { items: VecDeque::new(), reader: None }));
    (LocalSender(inner.clone()), LocalReceiver(inner))
}

impl<T> Clone for LocalSender<T> {
    fn clone(&self) -> Self {
        LocalSender(self.0.clone())
    }
}

impl<T> LocalSender<T> {
    pub fn send(&self, item: T) {
        let reader = {
            let mut inner = self.0.borrow_mut();
            inner.items.push_back(item);
            inner.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
    }
}

impl<T> LocalReceiver<T> {
    /// The oldest item, or `Pending` with the task registered to be woken by the next send.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        let mut inner = self.0.borrow_mut();
        if let Some(item) = inner.items.pop_front() {
            return Poll::Ready(item);
        }
        if !inner.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            inner.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn items_come_out_in_order_and_a_send_wakes_the_waiting_reader() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let (tx, mut rx) = local_queue();
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.clone().send(1);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        tx.send(2);
        assert_eq!(counter.0.load(Ordering::SeqCst), 1, "woken once until it polls again");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(1));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(2));
        assert!(rx.poll_recv(&mut cx).is_pending());
    }
}
