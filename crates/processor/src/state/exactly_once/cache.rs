//! The owned-key cache of a claim: what a key holds (a value, or nothing) as last read or
//! committed under the claim. While the claim holds, no other instance may write its keys,
//! so an entry stays true until this claim changes it; the cache is dropped when the claim
//! is fenced or its commit's outcome is unknown.
//!
//! Bounded by the bytes of its keys and values (plus a fixed overhead per entry), evicting
//! by CLOCK (second chance): a hit only sets a flag, so a lookup costs a hash and no
//! reordering; eviction sweeps a hand over the slots, sparing once each entry hit since the
//! hand last passed.

use std::collections::HashMap;

/// What an entry costs beyond its key (stored twice: index and slot) and value.
const ENTRY_OVERHEAD: usize = 64;

struct Slot {
    key: Vec<u8>,
    /// `None`: the key holds nothing.
    value: Option<Vec<u8>>,
    referenced: bool,
}

impl Slot {
    fn cost(&self) -> usize {
        cost(&self.key, self.value.as_deref())
    }
}

fn cost(key: &[u8], value: Option<&[u8]>) -> usize {
    2 * key.len() + value.map_or(0, <[u8]>::len) + ENTRY_OVERHEAD
}

/// A bounded map from key to what it holds (see the module docs).
pub(crate) struct OwnedCache {
    capacity: usize,
    used: usize,
    index: HashMap<Vec<u8>, usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    hand: usize,
}

impl OwnedCache {
    /// An empty cache of about `capacity` bytes (`0`: caches nothing).
    pub fn new(capacity: usize) -> Self {
        OwnedCache {
            capacity,
            used: 0,
            index: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            hand: 0,
        }
    }

    /// `Some(Some(value))` or `Some(None)` (known to hold nothing) when cached.
    pub fn get(&mut self, key: &[u8]) -> Option<Option<&[u8]>> {
        let &i = self.index.get(key)?;
        let slot = self.slots[i].as_mut()?;
        slot.referenced = true;
        Some(slot.value.as_deref())
    }

    /// Records what `key` holds, evicting others as needed; an entry larger than the whole
    /// cache is not kept (and replaces nothing: an older entry of the key is removed).
    pub fn insert(&mut self, key: &[u8], value: Option<Vec<u8>>) {
        self.remove(key);
        let c = cost(key, value.as_deref());
        if c > self.capacity {
            return;
        }
        while self.used + c > self.capacity {
            self.evict_one();
        }
        let slot = Slot {
            key: key.to_vec(),
            value,
            referenced: false,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.used += c;
        self.index.insert(key.to_vec(), i);
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: &[u8]) {
        if let Some(i) = self.index.remove(key) {
            if let Some(slot) = self.slots[i].take() {
                self.used -= slot.cost();
            }
            self.free.push(i);
        }
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        *self = OwnedCache::new(self.capacity);
    }

    /// The bytes accounted to the entries held.
    pub fn used(&self) -> usize {
        self.used
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Evicts the first entry the hand finds not hit since it last passed.
    fn evict_one(&mut self) {
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let i = self.hand;
            self.hand += 1;
            if let Some(slot) = &mut self.slots[i] {
                if slot.referenced {
                    slot.referenced = false;
                    continue;
                }
                let key = slot.key.clone();
                self.remove(&key);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    #[test]
    fn holds_values_and_absences() {
        let mut c = OwnedCache::new(1 << 20);
        c.insert(b"a", v("1"));
        c.insert(b"b", None);
        assert_eq!(c.get(b"a"), Some(Some(b"1".as_slice())));
        assert_eq!(c.get(b"b"), Some(None));
        assert_eq!(c.get(b"c"), None);
        c.insert(b"a", v("22"));
        assert_eq!(c.get(b"a"), Some(Some(b"22".as_slice())));
        assert_eq!(c.used(), cost(b"a", Some(b"22")) + cost(b"b", None));
        c.remove(b"a");
        assert_eq!(c.get(b"a"), None);
        assert_eq!(c.len(), 1);
        c.clear();
        assert_eq!((c.len(), c.used()), (0, 0));
    }

    #[test]
    fn stays_within_its_bound_and_spares_what_was_hit() {
        let each = cost(b"k000", Some(b"v"));
        let mut c = OwnedCache::new(10 * each);
        for i in 0..10 {
            c.insert(format!("k{i:03}").as_bytes(), v("v"));
        }
        assert_eq!(c.len(), 10);
        // k000 is hit: the next insert evicts k001, the first one not hit.
        assert!(c.get(b"k000").is_some());
        c.insert(b"k010", v("v"));
        assert_eq!(c.len(), 10);
        assert!(c.get(b"k000").is_some());
        assert_eq!(c.get(b"k001"), None);
        for i in 11..1000 {
            c.insert(format!("k{i:03}").as_bytes(), v("v"));
            assert!(c.used() <= 10 * each);
        }
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn an_entry_larger_than_the_cache_is_not_kept() {
        let mut c = OwnedCache::new(100);
        c.insert(b"k", v("small"));
        c.insert(b"k", Some(vec![0; 200]));
        assert_eq!(c.get(b"k"), None);
        assert_eq!(c.used(), 0);
        let mut off = OwnedCache::new(0);
        off.insert(b"k", None);
        assert_eq!(off.len(), 0);
    }
}
