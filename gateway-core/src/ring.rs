//! Draining a set of SPSC rings (`rtrb`) fairly: the one loop both the shard mesh and the
//! bridge's up side use, so a busy ring cannot starve the others within a turn's budget.

use rtrb::Consumer;

/// Takes up to `budget` items from `rings`, in turn, each ring's available run in one chunk;
/// returns how many were taken.
pub fn drain<'a, T: 'a>(
    rings: impl IntoIterator<Item = &'a mut Consumer<T>>,
    budget: usize,
    out: &mut impl Extend<T>,
) -> usize {
    let mut n = 0;
    for c in rings {
        let take = c.slots().min(budget - n);
        if take == 0 {
            continue;
        }
        if let Ok(chunk) = c.read_chunk(take) {
            out.extend(chunk);
            n += take;
        }
        if n >= budget {
            break;
        }
    }
    n
}

/// Like `drain`, but the budget is in `weight` units (a group delivery weighs its member
/// count), and at most `items_max` items: takes items while both last, so one heavy item may
/// end it; returns the weight and the items taken. Items past the budget stay in their ring.
pub fn drain_weighted<'a, T: 'a>(
    rings: impl IntoIterator<Item = &'a mut Consumer<T>>,
    budget: usize,
    items_max: usize,
    weight: impl Fn(&T) -> usize,
    out: &mut impl Extend<T>,
) -> (usize, usize) {
    let (mut n, mut items) = (0, 0);
    for c in rings {
        if n >= budget || items >= items_max {
            break;
        }
        let avail = c.slots();
        if avail == 0 {
            continue;
        }
        let Ok(chunk) = c.read_chunk(avail) else {
            continue;
        };
        // Dropping the iterator gives back only the slots it yielded.
        let mut iter = chunk.into_iter();
        while n < budget && items < items_max {
            let Some(item) = iter.next() else { break };
            n += weight(&item);
            items += 1;
            out.extend(std::iter::once(item));
        }
    }
    (n, items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtrb::RingBuffer;

    #[test]
    fn drains_in_ring_order_within_the_budget() {
        let (mut p1, mut c1) = RingBuffer::new(8);
        let (mut p2, mut c2) = RingBuffer::new(8);
        for i in 0..3 {
            p1.push(i).unwrap();
            p2.push(10 + i).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(drain([&mut c1, &mut c2], 4, &mut out), 4);
        assert_eq!(out, vec![0, 1, 2, 10]);
        assert_eq!(drain([&mut c1, &mut c2], 10, &mut out), 2);
        assert_eq!(out, vec![0, 1, 2, 10, 11, 12]);
    }

    #[test]
    fn weighted_drain_stops_once_the_budget_is_spent_and_keeps_the_rest() {
        let (mut p1, mut c1) = RingBuffer::new(8);
        let (mut p2, mut c2) = RingBuffer::new(8);
        for w in [3usize, 3, 3] {
            p1.push(w).unwrap();
        }
        p2.push(1).unwrap();
        let mut out = Vec::new();
        // 3 + 3 reaches 5: the third item and the second ring wait.
        assert_eq!(
            drain_weighted([&mut c1, &mut c2], 5, 100, |w| *w, &mut out),
            (6, 2)
        );
        assert_eq!(out, vec![3, 3]);
        assert_eq!((c1.slots(), c2.slots()), (1, 1));
        assert_eq!(
            drain_weighted([&mut c1, &mut c2], 5, 100, |w| *w, &mut out),
            (4, 2)
        );
        assert_eq!(out, vec![3, 3, 3, 1]);
        // Light items are capped by count as well.
        for _ in 0..4 {
            p2.push(1).unwrap();
        }
        assert_eq!(
            drain_weighted([&mut c1, &mut c2], 100, 3, |w| *w, &mut out),
            (3, 3)
        );
        assert_eq!(c2.slots(), 1);
    }
}
