//! An ownership store in memory, shared by cloning: for tests and simulations. Its outage
//! switches model a coordination service that cannot be reached, including the ambiguous
//! case where a swap took effect but its answer was lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::{
    check_swap, decide_swap, validate_vm_id, OwnershipRecord, OwnershipStore, StoreError, SwapOutcome, SwapResult,
};

/// Every clone shares one map of records and one set of outage switches.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore(Arc<Mutex<Shared>>);

#[derive(Debug, Default)]
struct Shared {
    records: BTreeMap<String, OwnershipRecord>,
    /// Every call fails with [`StoreError::Unreachable`] and changes nothing.
    unreachable: bool,
    /// Swaps take effect, but the caller gets [`StoreError::Unreachable`] (a reply lost).
    lose_replies: bool,
    swaps: u64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, every read and swap on every clone fails as unreachable and changes nothing.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.with(|shared| shared.unreachable = unreachable);
    }

    pub fn is_unreachable(&self) -> bool {
        self.with(|shared| shared.unreachable)
    }

    /// While set, a swap that would succeed is applied, yet the caller is told the store was
    /// unreachable: the outcome a caller sees when its connection drops after the commit.
    /// Reads still answer.
    pub fn set_lose_replies(&self, lose_replies: bool) {
        self.with(|shared| shared.lose_replies = lose_replies);
    }

    /// How many swaps have taken effect, on all clones.
    pub fn swap_count(&self) -> u64 {
        self.with(|shared| shared.swaps)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Shared) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }
}

fn unreachable() -> StoreError {
    StoreError::Unreachable { name: "memory (simulated outage)".to_string() }
}

impl OwnershipStore for MemoryStore {
    fn read(&mut self, vm_id: &str) -> Result<Option<OwnershipRecord>, StoreError> {
        validate_vm_id(vm_id)?;
        self.with(|shared| match shared.unreachable {
            true => Err(unreachable()),
            false => Ok(shared.records.get(vm_id).cloned()),
        })
    }

    fn compare_and_swap(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult {
        check_swap(vm_id, expected, new)?;
        self.with(|shared| {
            if shared.unreachable {
                return Err(unreachable());
            }
            let outcome = decide_swap(shared.records.get(vm_id), expected, new);
            if let SwapOutcome::Swapped(record) = &outcome {
                shared.records.insert(vm_id.to_string(), record.clone());
                shared.swaps += 1;
                if shared.lose_replies {
                    return Err(unreachable());
                }
            }
            Ok(outcome)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VmState;

    fn active(generation: u64, owner: &str) -> OwnershipRecord {
        OwnershipRecord { generation, owner: owner.to_string(), state: VmState::Active }
    }

    #[test]
    fn clones_share_one_set_of_records() {
        let mut a = MemoryStore::new();
        let mut b = a.clone();
        assert_eq!(a.compare_and_swap("vm", None, &active(1, "a")).unwrap(), SwapOutcome::Swapped(active(1, "a")));
        assert_eq!(
            b.compare_and_swap("vm", None, &active(1, "b")).unwrap(),
            SwapOutcome::Conflict(Some(active(1, "a")))
        );
        assert_eq!(b.compare_and_swap("vm", Some(1), &active(2, "b")).unwrap(), SwapOutcome::Swapped(active(2, "b")));
        assert_eq!(a.read("vm").unwrap(), Some(active(2, "b")));
        assert_eq!(a.read("other").unwrap(), None);
        assert_eq!(a.swap_count(), 2);
    }

    #[test]
    fn a_swap_expecting_a_record_that_does_not_exist_conflicts_with_none() {
        let mut store = MemoryStore::new();
        assert_eq!(store.compare_and_swap("vm", Some(3), &active(4, "a")).unwrap(), SwapOutcome::Conflict(None));
        assert_eq!(store.read("vm").unwrap(), None);
    }

    #[test]
    fn an_ended_record_is_swapped_only_from_its_own_generation() {
        let mut store = MemoryStore::new();
        store.compare_and_swap("vm", None, &active(1, "a")).unwrap();
        let ended = OwnershipRecord { generation: 2, owner: "a".into(), state: VmState::Ended { exit_code: 3 } };
        assert_eq!(store.compare_and_swap("vm", Some(1), &ended).unwrap(), SwapOutcome::Swapped(ended.clone()));
        // A backup holding generation 1 cannot resurrect it.
        assert_eq!(store.compare_and_swap("vm", Some(1), &active(2, "b")).unwrap(), SwapOutcome::Conflict(Some(ended)));
    }

    #[test]
    fn an_outage_fails_every_call_and_changes_nothing_until_it_ends() {
        let mut a = MemoryStore::new();
        let mut b = a.clone();
        a.compare_and_swap("vm", None, &active(1, "a")).unwrap();
        b.set_unreachable(true);
        assert!(a.is_unreachable());
        let error = a.compare_and_swap("vm", Some(1), &active(2, "a")).unwrap_err();
        assert_eq!(error.to_string(), "ownership store memory (simulated outage) is unreachable");
        assert!(matches!(b.read("vm"), Err(StoreError::Unreachable { .. })));
        b.set_unreachable(false);
        assert_eq!(a.read("vm").unwrap(), Some(active(1, "a")));
        assert_eq!(a.swap_count(), 1);
    }

    #[test]
    fn a_lost_reply_still_applies_the_swap() {
        let mut store = MemoryStore::new();
        store.set_lose_replies(true);
        assert!(matches!(store.compare_and_swap("vm", None, &active(1, "a")), Err(StoreError::Unreachable { .. })));
        assert_eq!(store.read("vm").unwrap(), Some(active(1, "a")));
        // A conflict is answered (nothing was written, so there is no reply to lose).
        assert_eq!(
            store.compare_and_swap("vm", None, &active(1, "b")).unwrap(),
            SwapOutcome::Conflict(Some(active(1, "a")))
        );
    }

    #[test]
    fn bad_arguments_are_errors_even_during_an_outage() {
        let mut store = MemoryStore::new();
        store.set_unreachable(true);
        assert!(matches!(store.read("../x"), Err(StoreError::BadVmId { .. })));
        assert!(matches!(store.compare_and_swap("vm", None, &active(2, "a")), Err(StoreError::BadGeneration { .. })));
    }

    #[test]
    fn the_store_is_usable_behind_a_box() {
        let mut store: Box<dyn OwnershipStore> = Box::new(MemoryStore::new());
        fn swap_one(store: &mut impl OwnershipStore) -> SwapOutcome {
            store.compare_and_swap("vm", None, &active(1, "a")).unwrap()
        }
        assert_eq!(swap_one(&mut store), SwapOutcome::Swapped(active(1, "a")));
    }
}
