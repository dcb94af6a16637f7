//! The GPU backends' device counters as the books' counts: the one translation from the
//! counter words (`kv_kernels::layout::counter`, numbered alike on CUDA and wgpu) into what
//! [`Books`] takes after a put or a delete.

use kv_core::{Applied, Books, Result};
use kv_kernels::layout::counter;

/// Hands the counters `c` a put left (whole or, after a fault, in part) to `books`; a put
/// that lost keys is [`kv_core::Error::Device`] from `backend`.
///
/// ```
/// use kv_core::{Books, TableConfig};
/// use kv_kernels::layout::counter;
/// let mut books = Books::new(&TableConfig::new(100));
/// let mut c = [0u64; counter::LEN];
/// (c[counter::INSERTED], c[counter::FROM_EMPTY], c[counter::SPEC_INSERTED]) = (3, 3, 1);
/// kv_staging::counts::apply_put(&mut books, &c, "doc")?;
/// assert_eq!(books.len(), 4);
/// c[counter::REMOVED] = 2;
/// assert_eq!(kv_staging::counts::apply_delete(&mut books, &c), 2);
/// # Ok::<(), kv_core::Error>(())
/// ```
pub fn apply_put(books: &mut Books, c: &[u64; counter::LEN], backend: &'static str) -> Result<()> {
    let applied = Applied {
        inserted: c[counter::INSERTED],
        from_empty: c[counter::FROM_EMPTY],
        special: c[counter::SPEC_INSERTED],
        lost: c[counter::ERRORS],
    };
    books.apply_put(applied, backend)
}

/// Hands the counters `c` a delete left to `books`; returns the entries removed.
pub fn apply_delete(books: &mut Books, c: &[u64; counter::LEN]) -> usize {
    books.apply_delete(c[counter::REMOVED], c[counter::SPEC_REMOVED])
}
