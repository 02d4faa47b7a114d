//! A slab whose keys carry a generation, so a key cannot outlive its value.
//!
//! A slot freed by a close may be taken again by an accept later in the same
//! `poll` batch. Events and timers for the old occupant still name the slot;
//! the generation in their [`Key`] no longer matches, so [`Slab::get`]
//! answers `None` and they are dropped (ARCHITECTURE.md, "Tokens").

/// Bits of a generation that survive in a poll token (see `reactor::token`).
pub(crate) const GENERATION_BITS: u32 = 29;
const GENERATION_MASK: u32 = (1 << GENERATION_BITS) - 1;

/// A slot index and the generation of the value that was put there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key {
    index: u32,
    generation: u32,
}

impl Key {
    /// A key from its parts (the generation is cut to `GENERATION_BITS`).
    pub(crate) fn from_parts(index: u32, generation: u32) -> Key {
        Key { index, generation: generation & GENERATION_MASK }
    }

    /// The slot index.
    pub(crate) fn index(self) -> u32 {
        self.index
    }

    /// The generation of the slot's occupant.
    pub(crate) fn generation(self) -> u32 {
        self.generation
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Values stored under reusable, generation-checked keys.
pub(crate) struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    /// The key the next `insert` will return (to register a socket first).
    pub(crate) fn vacant_key(&self) -> Key {
        match self.free.last() {
            Some(&i) => Key { index: i, generation: self.slots[i as usize].generation },
            None => Key { index: self.slots.len() as u32, generation: 0 },
        }
    }

    /// Stores `value`, returning its key (the one `vacant_key` named).
    pub(crate) fn insert(&mut self, value: T) -> Key {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                let slot = &mut self.slots[i as usize];
                slot.value = Some(value);
                Key { index: i, generation: slot.generation }
            }
            None => {
                self.slots.push(Slot { generation: 0, value: Some(value) });
                Key { index: (self.slots.len() - 1) as u32, generation: 0 }
            }
        }
    }

    /// Removes and returns the value under `key`; `None` if the key is stale.
    /// The slot's generation moves on, so every copy of `key` goes stale.
    pub(crate) fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let value = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    /// The value under `key`, unless the key is stale.
    pub(crate) fn get(&self, key: Key) -> Option<&T> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_ref()
    }

    /// The value under `key`, mutably, unless the key is stale.
    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.value.as_mut()
    }

    /// How many values are stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every stored value, mutably.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().filter_map(|s| s.value.as_mut())
    }

    /// Every stored (key, value).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.value.as_ref().map(|v| (Key { index: i as u32, generation: s.generation }, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_does_not_answer_to_the_old_key() {
        let mut s = Slab::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None, "a second remove with the same key");
        // The next insert takes a's slot, under a new generation.
        let next = s.vacant_key();
        assert_eq!(next.index(), a.index());
        assert_ne!(next, a);
        let c = s.insert("c");
        assert_eq!(c, next);
        assert_eq!(s.get(a), None, "the stale key must not reach the new value");
        assert_eq!(s.get_mut(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(c), Some(&"c"));
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.iter().map(|(k, v)| (k, *v)).collect::<Vec<_>>(), vec![(c, "c"), (b, "b")]);
    }

    #[test]
    fn generations_wrap_within_their_bits() {
        let mut s = Slab::default();
        let mut k = s.insert(0u32);
        for i in 1..2000u32 {
            s.remove(k);
            k = s.insert(i);
            assert_eq!(k.index(), 0);
            assert!(k.generation() <= GENERATION_MASK);
        }
        s.slots[0].generation = GENERATION_MASK;
        let old = Key::from_parts(0, GENERATION_MASK);
        s.remove(old);
        let k = s.insert(7);
        assert_eq!(k.generation(), 0);
        assert_eq!(s.get(old), None);
    }
}
