//! A hashed timing wheel over dense `u32` ids (a shard's slab keys): O(1) insert and cancel,
//! and advancing costs the entries that come due plus one slot visit per tick.
//!
//! Links live in a vector indexed by id (12 bytes per id, no allocation per timer). Deadlines
//! further out than one turn of the wheel stay in their slot and are skipped until their round.
//! The shard arms one timer per connection: the handshake deadline, then the heartbeat
//! deadline, which it re-arms lazily (on expiry it checks when the connection was last seen).

const NIL: u32 = u32::MAX;
const UNARMED: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    /// Absolute tick, or `UNARMED`.
    deadline: u32,
}

pub struct Wheel {
    heads: Vec<u32>,
    links: Vec<Link>,
    mask: u32,
    /// Ticks up to and including this one have been processed.
    now: u32,
    armed: usize,
}

impl Wheel {
    /// `slots` is rounded up to a power of two; `ids` is the expected id range (grows on demand).
    pub fn new(slots: usize, ids: usize) -> Wheel {
        let slots = slots.next_power_of_two().max(2);
        assert!(slots <= 1 << 20, "timing wheel of {slots} slots");
        Wheel {
            heads: vec![NIL; slots],
            links: Vec::with_capacity(ids),
            mask: slots as u32 - 1,
            now: 0,
            armed: 0,
        }
    }

    pub fn now(&self) -> u32 {
        self.now
    }

    pub fn armed(&self) -> usize {
        self.armed
    }

    pub fn is_armed(&self, id: u32) -> bool {
        self.links
            .get(id as usize)
            .is_some_and(|l| l.deadline != UNARMED)
    }

    /// Arms `id` to fire at `deadline` (an absolute tick; one in the past fires on the next
    /// advance). Re-arming an armed id moves it.
    pub fn insert(&mut self, id: u32, deadline: u32) {
        assert!(id != NIL);
        let idx = id as usize;
        if idx >= self.links.len() {
            self.links.resize(
                idx + 1,
                Link {
                    prev: NIL,
                    next: NIL,
                    deadline: UNARMED,
                },
            );
        }
        self.cancel(id);
        let deadline = deadline.max(self.now + 1).min(UNARMED - 1);
        let slot = (deadline & self.mask) as usize;
        let head = self.heads[slot];
        self.links[idx] = Link {
            prev: NIL,
            next: head,
            deadline,
        };
        if head != NIL {
            self.links[head as usize].prev = id;
        }
        self.heads[slot] = id;
        self.armed += 1;
    }

    /// Disarms `id`; a no-op when it is not armed.
    pub fn cancel(&mut self, id: u32) {
        let Some(l) = self.links.get(id as usize).copied() else {
            return;
        };
        if l.deadline == UNARMED {
            return;
        }
        if l.prev != NIL {
            self.links[l.prev as usize].next = l.next;
        } else {
            self.heads[(l.deadline & self.mask) as usize] = l.next;
        }
        if l.next != NIL {
            self.links[l.next as usize].prev = l.prev;
        }
        self.links[id as usize] = Link {
            prev: NIL,
            next: NIL,
            deadline: UNARMED,
        };
        self.armed -= 1;
    }

    /// Moves time to `now` and appends every id whose deadline is `<= now` to `expired`
    /// (disarmed). Visits at most one full turn of slots however far time jumped.
    pub fn advance(&mut self, now: u32, expired: &mut Vec<u32>) {
        if now <= self.now {
            return;
        }
        let steps = (now - self.now).min(self.mask + 1);
        for step in 1..=steps {
            let slot = ((self.now + step) & self.mask) as usize;
            let mut id = self.heads[slot];
            while id != NIL {
                let l = self.links[id as usize];
                if l.deadline <= now {
                    self.cancel(id);
                    expired.push(id);
                }
                id = l.next;
            }
        }
        self.now = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advance(w: &mut Wheel, now: u32) -> Vec<u32> {
        let mut v = Vec::new();
        w.advance(now, &mut v);
        v.sort_unstable();
        v
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = Wheel::new(8, 4);
        w.insert(1, 3);
        w.insert(2, 5);
        assert_eq!(advance(&mut w, 2), Vec::<u32>::new());
        assert_eq!(advance(&mut w, 3), vec![1]);
        assert_eq!(advance(&mut w, 4), Vec::<u32>::new());
        assert_eq!(advance(&mut w, 5), vec![2]);
        assert_eq!(w.armed(), 0);
    }

    #[test]
    fn deadlines_beyond_one_turn_wait_for_their_round() {
        let mut w = Wheel::new(8, 4);
        w.insert(1, 2);
        w.insert(2, 10); // same slot as 2, one turn later
        assert_eq!(advance(&mut w, 2), vec![1]);
        assert_eq!(advance(&mut w, 9), Vec::<u32>::new());
        assert_eq!(advance(&mut w, 10), vec![2]);
    }

    #[test]
    fn cancel_and_rearm_are_o1_and_correct() {
        let mut w = Wheel::new(16, 0);
        for id in 0..100 {
            w.insert(id, 5);
        }
        for id in (0..100).step_by(2) {
            w.cancel(id);
        }
        w.cancel(1000); // never armed: no-op
        w.insert(1, 7); // move
        assert_eq!(w.armed(), 50);
        let fired = advance(&mut w, 5);
        assert_eq!(fired.len(), 49);
        assert!(fired.iter().all(|id| id % 2 == 1 && *id != 1));
        assert_eq!(advance(&mut w, 7), vec![1]);
    }

    #[test]
    fn a_long_jump_fires_everything_due() {
        let mut w = Wheel::new(8, 0);
        for id in 0..20 {
            w.insert(id, id + 1);
        }
        assert_eq!(advance(&mut w, 1000).len(), 20);
        // Past deadlines fire on the next tick.
        w.insert(3, 0);
        assert_eq!(advance(&mut w, 1001), vec![3]);
    }
}
