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
}
