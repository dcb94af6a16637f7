//! What a host batch does: [`Op`], with the caller's output slices.

/// What a host batch does, with its output slices.
pub(crate) enum Op<'a> {
    Put {
        values: &'a [u64],
    },
    Get {
        values: &'a mut [u64],
        found: &'a mut [bool],
    },
    Contains {
        found: &'a mut [bool],
    },
    Delete,
    /// Counts the keys not in the table (every occurrence) into `counter::MISSING`.
    CountMissing,
}

impl Op<'_> {
    /// Whether the batch changes the table and so keeps counts (a put or a delete).
    pub fn counts(&self) -> bool {
        matches!(self, Op::Put { .. } | Op::Delete | Op::CountMissing)
    }
}
