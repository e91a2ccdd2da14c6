//! Output commit on the primary: outputs the guest produced (transmitted frames, console
//! bytes) wait here, tagged with the epoch that produced them, until the backup has
//! acknowledged that epoch's checkpoint ([`crate::PrimaryAction::ReleaseOutputs`]).

use std::collections::VecDeque;

use thiserror::Error;

/// The buffer is full: pause the guest until outputs are released.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{held} outputs are waiting for the backup's acknowledgement, the limit: the guest must wait")]
pub struct OutputBufferFull<O> {
    pub held: usize,
    /// The output that did not fit, handed back.
    pub output: O,
}

/// Outputs held until their epoch is acknowledged, at most `limit` of them.
#[derive(Debug, Clone)]
pub struct OutputBuffer<O> {
    held: VecDeque<(u64, O)>,
    limit: usize,
    released_through: Option<u64>,
}

impl<O> OutputBuffer<O> {
    pub fn new(limit: usize) -> Self {
        OutputBuffer { held: VecDeque::new(), limit, released_through: None }
    }

    /// Holds an output of `epoch`, the epoch being executed (not yet checkpointed).
    pub fn push(&mut self, epoch: u64, output: O) -> Result<(), OutputBufferFull<O>> {
        assert!(
            self.released_through.is_none_or(|r| epoch > r),
            "an output of epoch {epoch} arrived after that epoch was released"
        );
        assert!(self.held.back().is_none_or(|&(last, _)| epoch >= last), "outputs arrive in epoch order");
        if self.held.len() >= self.limit {
            return Err(OutputBufferFull { held: self.held.len(), output });
        }
        self.held.push_back((epoch, output));
        Ok(())
    }

    /// Takes every output of `up_to_epoch` and earlier, in the order they were produced.
    pub fn release(&mut self, up_to_epoch: u64) -> Vec<O> {
        self.released_through = self.released_through.max(Some(up_to_epoch));
        let count = self.held.iter().take_while(|(epoch, _)| *epoch <= up_to_epoch).count();
        self.held.drain(..count).map(|(_, output)| output).collect()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_leave_only_once_their_epoch_is_released_and_in_order() {
        let mut buffer = OutputBuffer::new(10);
        buffer.push(1, "a").unwrap();
        buffer.push(2, "b").unwrap();
        buffer.push(2, "c").unwrap();
        assert_eq!(buffer.release(0), Vec::<&str>::new());
        assert_eq!(buffer.release(1), vec!["a"]);
        assert_eq!(buffer.release(5), vec!["b", "c"]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_full_buffer_hands_the_output_back() {
        let mut buffer = OutputBuffer::new(1);
        buffer.push(1, 10).unwrap();
        assert_eq!(buffer.push(1, 11), Err(OutputBufferFull { held: 1, output: 11 }));
    }

    #[test]
    #[should_panic(expected = "after that epoch was released")]
    fn an_output_of_a_released_epoch_is_a_caller_bug() {
        let mut buffer = OutputBuffer::new(4);
        buffer.release(3);
        let _ = buffer.push(3, ());
    }
}
