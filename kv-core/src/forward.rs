//! Tables that hand every call to another table: [`forward_kv_backend!`] and
//! [`forward_byte_table!`] write the whole trait once, optional methods included, so that a
//! wrapper never answers `Unsupported` for a capability its inner table has because one
//! method was left out (the optional methods' defaults would compile silently). A method
//! added to [`KvBackend`](crate::KvBackend) or [`ByteTable`](crate::ByteTable) is added
//! here too, and every wrapper forwards it.

/// Implements [`KvBackend`](crate::KvBackend) for `$ty` by handing every method, optional
/// ones included, to its field `$field` (any [`KvBackend`](crate::KvBackend), e.g. a
/// `Box<dyn KvBackend>`).
///
/// ```
/// use kv_core::KvBackend;
/// /// A table with a name for the logs; everything else is its inner table's.
/// struct Named {
///     name: &'static str,
///     inner: Box<dyn KvBackend>,
/// }
/// kv_core::forward_kv_backend!(Named, inner);
/// impl Named {
///     fn label(&self) -> String {
///         format!("{} ({} entries)", self.name, self.len())
///     }
/// }
/// # let _ = Named::label;
/// ```
#[macro_export]
macro_rules! forward_kv_backend {
    ($ty:ty, $field:ident) => {
        impl $crate::KvBackend for $ty {
            fn width(&self) -> usize {
                self.$field.width()
            }
            fn put(&self, keys: &[u64], values: &[u64]) -> $crate::Result<()> {
                self.$field.put(keys, values)
            }
            fn get(
                &self,
                keys: &[u64],
                values_out: &mut [u64],
                found_out: &mut [bool],
            ) -> $crate::Result<()> {
                self.$field.get(keys, values_out, found_out)
            }
            fn delete(&self, keys: &[u64]) -> $crate::Result<usize> {
                self.$field.delete(keys)
            }
            fn contains(&self, keys: &[u64], found_out: &mut [bool]) -> $crate::Result<()> {
                self.$field.contains(keys, found_out)
            }
            fn len(&self) -> usize {
                self.$field.len()
            }
            fn is_empty(&self) -> bool {
                self.$field.is_empty()
            }
            fn capacity(&self) -> usize {
                self.$field.capacity()
            }
            fn clear(&self) -> $crate::Result<()> {
                self.$field.clear()
            }
            fn describe(&self) -> $crate::Description {
                self.$field.describe()
            }
            fn audit(&self) -> $crate::Result<$crate::Audit> {
                self.$field.audit()
            }
            fn put_and_evict(
                &self,
                batch: $crate::CachePut<'_>,
                evicted: &mut $crate::Evicted<'_>,
            ) -> $crate::Result<usize> {
                self.$field.put_and_evict(batch, evicted)
            }
            fn put_cached(&self, batch: $crate::CachePut<'_>) -> $crate::Result<usize> {
                self.$field.put_cached(batch)
            }
            fn peek(
                &self,
                keys: &[u64],
                values_out: &mut [u64],
                found_out: &mut [bool],
            ) -> $crate::Result<()> {
                self.$field.peek(keys, values_out, found_out)
            }
            fn take(
                &self,
                keys: &[u64],
                values_out: &mut [u64],
                found_out: &mut [bool],
                expires_out: &mut [u64],
            ) -> $crate::Result<usize> {
                self.$field.take(keys, values_out, found_out, expires_out)
            }
            fn eviction_scope(&self, key: u64) -> $crate::Result<u64> {
                self.$field.eviction_scope(key)
            }
            fn cache_policy(&self) -> $crate::Result<$crate::CachePolicy> {
                self.$field.cache_policy()
            }
            fn cache_stats(&self) -> $crate::Result<$crate::CacheStats> {
                self.$field.cache_stats()
            }
            fn export(&self) -> $crate::Result<$crate::TableImage> {
                self.$field.export()
            }
            fn restore(&self, part: $crate::ImagePart<'_>) -> $crate::Result<()> {
                self.$field.restore(part)
            }
        }
    };
}

/// Implements [`ByteTable`](crate::ByteTable) for `$ty` by handing every method, optional
/// ones included, to its field `$field` (any [`ByteTable`](crate::ByteTable), e.g. a
/// `Box<dyn ByteTable>`).
///
/// ```
/// use kv_core::ByteTable;
/// /// A byte table with a name for the logs; everything else is its inner table's.
/// struct Named {
///     name: &'static str,
///     inner: Box<dyn ByteTable>,
/// }
/// kv_core::forward_byte_table!(Named, inner);
/// impl Named {
///     fn label(&self) -> String {
///         format!("{} ({} entries)", self.name, self.len())
///     }
/// }
/// # let _ = Named::label;
/// ```
#[macro_export]
macro_rules! forward_byte_table {
    ($ty:ty, $field:ident) => {
        impl $crate::ByteTable for $ty {
            fn put(
                &self,
                keys: $crate::Binary<'_>,
                values: $crate::Binary<'_>,
            ) -> $crate::Result<()> {
                self.$field.put(keys, values)
            }
            fn get(
                &self,
                keys: $crate::Binary<'_>,
                values_out: &mut $crate::BinaryBuf,
                found_out: &mut [bool],
            ) -> $crate::Result<()> {
                self.$field.get(keys, values_out, found_out)
            }
            fn delete(&self, keys: $crate::Binary<'_>) -> $crate::Result<usize> {
                self.$field.delete(keys)
            }
            fn contains(
                &self,
                keys: $crate::Binary<'_>,
                found_out: &mut [bool],
            ) -> $crate::Result<()> {
                self.$field.contains(keys, found_out)
            }
            fn len(&self) -> usize {
                self.$field.len()
            }
            fn is_empty(&self) -> bool {
                self.$field.is_empty()
            }
            fn capacity(&self) -> usize {
                self.$field.capacity()
            }
            fn clear(&self) -> $crate::Result<()> {
                self.$field.clear()
            }
            fn limits(&self) -> $crate::ByteLimits {
                self.$field.limits()
            }
            fn describe(&self) -> $crate::ByteDescription {
                self.$field.describe()
            }
            fn put_ttl(
                &self,
                keys: $crate::Binary<'_>,
                values: $crate::Binary<'_>,
                ttl_ms: &[u64],
            ) -> $crate::Result<()> {
                self.$field.put_ttl(keys, values, ttl_ms)
            }
            fn expire(
                &self,
                keys: $crate::Binary<'_>,
                ttl_ms: &[u64],
                found_out: &mut [bool],
            ) -> $crate::Result<()> {
                self.$field.expire(keys, ttl_ms, found_out)
            }
            fn ttl(&self, keys: $crate::Binary<'_>, ttl_out: &mut [i64]) -> $crate::Result<()> {
                self.$field.ttl(keys, ttl_out)
            }
            fn export(&self) -> $crate::Result<$crate::ByteImage> {
                self.$field.export()
            }
        }
    };
}
