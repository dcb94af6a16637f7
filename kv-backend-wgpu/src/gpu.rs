//! Adapters, the shared device per adapter, and its cached layouts and pipelines.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use kv_core::{Error, Result, TableConfig};

use crate::shader::{self, BATCH_FIXED, Flavour, REHASH_FIXED};

/// The backend's name in errors and descriptions.
pub(crate) const BACKEND: &str = "wgpu";

/// The features the table's shaders need: u64 arithmetic and 64-bit atomics (CAS, max).
const REQUIRED: [(wgpu::Features, &str); 2] = [
    (wgpu::Features::SHADER_INT64, "SHADER_INT64"),
    (
        wgpu::Features::SHADER_INT64_ATOMIC_ALL_OPS,
        "SHADER_INT64_ATOMIC_ALL_OPS",
    ),
];

/// The device features a traced table's GPU timestamps need (`gpu_trace`): timestamp
/// queries, written on encoders (between copies and between compute passes). A device is
/// created with them where the adapter offers them; only traced tables use them.
pub(crate) const TIMESTAMPS: wgpu::Features =
    wgpu::Features::TIMESTAMP_QUERY.union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);

/// The probe budget on a software adapter (Mesa's llvmpipe/lavapipe, which stops an
/// invocation's loops after about 65,535 iterations in all): well below that, with room for
/// the other loops of a kernel.
pub const CPU_PROBE_BUDGET: u32 = 4096;

/// The probe budget on a GPU: beyond the longest chain of random keys at the highest load
/// factor (estimated near 14,000 slots at 0.95 in a table of 10^8 keys:
/// docs/adversarial-keys.md), so that only crafted keys ever need a resume round.
pub const GPU_PROBE_BUDGET: u32 = 1 << 15;

/// The largest storage binding used, whatever the adapter reports: Vulkan drivers cap
/// bindings near 2 GiB (a u32 range) even where more is reported.
const BINDING_CAP: u64 = (2 << 30) - 4096;

/// One adapter wgpu offers on this machine, as [`adapters`](crate::adapters) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// The adapter's index: the ordinal [`TableConfig::device`](kv_core::TableConfig::device) takes.
    pub index: usize,
    /// The adapter's name, as its driver reports it.
    pub name: String,
    /// The graphics API wgpu reaches it through (`vulkan`, `metal`, `dx12`).
    pub backend: String,
    /// Discrete GPU, integrated GPU, CPU (software rasteriser, e.g. lavapipe), ...
    pub device_type: String,
    /// Whether it is a discrete GPU (the only kind vramkv's automatic choice uses).
    pub discrete: bool,
    /// The required features it lacks (empty: the backend can use it).
    pub missing: Vec<&'static str>,
}

impl AdapterInfo {
    /// Whether the adapter offers 64-bit integers and 64-bit atomics, which the backend needs.
    pub fn int64_atomics(&self) -> bool {
        self.missing.is_empty()
    }
}

impl fmt::Display for AdapterInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {} ({}, {}), 64-bit atomics: ",
            self.index, self.name, self.backend, self.device_type
        )?;
        if self.missing.is_empty() {
            f.write_str("yes")
        } else {
            write!(f, "no (missing {})", self.missing.join(", "))
        }
    }
}

struct Registry {
    adapters: Vec<wgpu::Adapter>,
    devices: Mutex<HashMap<usize, Arc<Gpu>>>,
}

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| {
        // Without indirect-call validation (the backend makes no indirect calls), which
        // would cap every buffer below 4 GiB: the table's arrays are allocated as single
        // buffers as large as the adapter allows.
        let desc = wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            flags: wgpu::InstanceFlags::default()
                .difference(wgpu::InstanceFlags::VALIDATION_INDIRECT_CALL),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        };
        let instance = wgpu::Instance::new(desc);
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
        Registry {
            adapters,
            devices: Mutex::new(HashMap::new()),
        }
    })
}

fn missing(features: wgpu::Features) -> Vec<&'static str> {
    REQUIRED
        .iter()
        .filter(|(f, _)| !features.contains(*f))
        .map(|(_, n)| *n)
        .collect()
}

pub(crate) fn adapter_infos() -> Vec<AdapterInfo> {
    registry()
        .adapters
        .iter()
        .enumerate()
        .map(|(index, a)| {
            let info = a.get_info();
            AdapterInfo {
                index,
                name: info.name.clone(),
                backend: info.backend.to_string(),
                device_type: format!("{:?}", info.device_type),
                discrete: info.device_type == wgpu::DeviceType::DiscreteGpu,
                missing: missing(a.features()),
            }
        })
        .collect()
}

/// An error with its chain of sources, one per line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!("\n  caused by: {c}"));
        cur = c.source();
    }
    s
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn unavailable(reason: String) -> Error {
    Error::BackendUnavailable {
        backend: BACKEND,
        reason,
    }
}

pub(crate) fn device_error(message: impl Into<String>) -> Error {
    Error::device(BACKEND, message)
}

pub(crate) fn oom(requested_bytes: u64) -> Error {
    Error::OutOfDeviceMemory {
        backend: BACKEND,
        requested_bytes,
    }
}

/// The adapter a table with `cfg` opens on: its device if set, else the first discrete GPU
/// with the features, else the first adapter with them.
fn choose(cfg: &TableConfig) -> Result<usize> {
    let infos = adapter_infos();
    if infos.is_empty() {
        return Err(unavailable(
            "no wgpu adapter (no Vulkan, Metal or DX12 driver found)".into(),
        ));
    }
    if let Some(i) = cfg.device_among(infos.len(), "wgpu")? {
        let a = &infos[i];
        if !a.missing.is_empty() {
            return Err(unavailable(format!(
                "adapter #{i} {} lacks {}",
                a.name,
                a.missing.join(" and ")
            )));
        }
        return Ok(i);
    }
    let usable = |a: &&AdapterInfo| a.missing.is_empty();
    if let Some(a) = infos.iter().filter(usable).find(|a| a.discrete) {
        return Ok(a.index);
    }
    if let Some(a) = infos.iter().find(usable) {
        return Ok(a.index);
    }
    Err(unavailable(format!(
        "no adapter offers 64-bit atomics: {}",
        infos
            .iter()
            .map(|a| format!("{} lacks {}", a.name, a.missing.join(" and ")))
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

/// The shared device of the adapter `cfg` chooses (created once per process).
pub(crate) fn gpu(cfg: &TableConfig) -> Result<Arc<Gpu>> {
    let index = choose(cfg)?;
    let reg = registry();
    let mut devices = lock(&reg.devices);
    if let Some(g) = devices.get(&index) {
        g.check()?;
        return Ok(g.clone());
    }
    let g = Arc::new(Gpu::new(index, &reg.adapters[index])?);
    devices.insert(index, g.clone());
    Ok(g)
}

/// A bind group layout and the pipeline layout made of it.
pub(crate) struct Layout {
    pub bgl: wgpu::BindGroupLayout,
    pub pl: wgpu::PipelineLayout,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum PipeKey {
    Batch(usize, &'static str),
    Rehash(usize),
    /// A kernel of a module with a fixed layout (cache, bytes).
    Fixed(Fixed, &'static str),
}

/// A module whose bind group layout does not depend on the table: the cache module
/// (`shader::cache_module`) and the byte-table module (`bytes_shader::module`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Fixed {
    /// The cache table's kernels.
    Cache,
    /// The byte table's kernels.
    Bytes,
}

impl Fixed {
    /// Storage bindings after the parameters.
    fn storage(self) -> u32 {
        match self {
            Fixed::Cache => shader::CACHE_STORAGE,
            Fixed::Bytes => crate::bytes_shader::STORAGE,
        }
    }

    fn source(self) -> String {
        match self {
            Fixed::Cache => shader::cache_module(),
            Fixed::Bytes => crate::bytes_shader::module(),
        }
    }
}

/// One adapter's device, shared by every table on it.
pub(crate) struct Gpu {
    pub name: String,
    pub discrete: bool,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// The largest storage binding the table uses (and buffer the lanes use), in bytes.
    pub max_binding: u64,
    /// The largest buffer the device allows (its `max_buffer_size`), in bytes: the table's
    /// key and value arrays are allocated in buffers of up to this size, each segment a
    /// range of one.
    pub max_buffer: u64,
    /// The alignment of a storage binding's offset in its buffer
    /// (`min_storage_buffer_offset_alignment`), in bytes.
    pub storage_align: u64,
    /// The most workgroups per dispatch dimension.
    pub max_groups: u32,
    /// The most storage buffers one shader may bind.
    pub max_storage: u32,
    /// The default probe budget of a table on this device: the most slots one invocation
    /// probes per dispatch (shader module docs, "Bounded probes").
    pub probe_budget: u32,
    /// Whether the device was created with timestamp queries (see `gpu_trace`).
    pub timestamps: bool,
    /// Set when the device is lost (with the driver's message).
    lost: Arc<Mutex<Option<String>>>,
    /// The first error that no error scope caught.
    uncaptured: Arc<Mutex<Option<String>>>,
    batch_layouts: Mutex<HashMap<usize, Arc<Layout>>>,
    rehash_layouts: Mutex<HashMap<usize, Arc<Layout>>>,
    modules: Mutex<HashMap<(Flavour, usize, bool), wgpu::ShaderModule>>,
    fixed_layouts: Mutex<HashMap<Fixed, Arc<Layout>>>,
    fixed_modules: Mutex<HashMap<Fixed, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipeKey, Arc<wgpu::ComputePipeline>>>,
}

impl Gpu {
    fn new(index: usize, adapter: &wgpu::Adapter) -> Result<Gpu> {
        let info = adapter.get_info();
        // The adapter's own limits, requested as they are: `limits` is what the device has.
        let limits = adapter.limits();
        let features = REQUIRED
            .iter()
            .fold(wgpu::Features::empty(), |a, f| a | f.0)
            | (adapter.features() & TIMESTAMPS);
        let desc = wgpu::DeviceDescriptor {
            label: Some("vramkv"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            unavailable(format!(
                "adapter #{index} {}: request_device: {e}",
                info.name
            ))
        })?;
        let lost = Arc::new(Mutex::new(None));
        let l = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            *lock(&l) = Some(format!("device lost ({reason:?}): {msg}"));
        });
        let uncaptured = Arc::new(Mutex::new(None));
        let u = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            lock(&u).get_or_insert_with(|| error_chain(&e));
        }));
        let timestamps = device.features().contains(TIMESTAMPS);
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size)
            .min(BINDING_CAP);
        Ok(Gpu {
            name: info.name.clone(),
            discrete: info.device_type == wgpu::DeviceType::DiscreteGpu,
            device,
            queue,
            max_binding,
            max_buffer: limits.max_buffer_size,
            storage_align: u64::from(limits.min_storage_buffer_offset_alignment).max(1),
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
            max_storage: limits
                .max_storage_buffers_per_shader_stage
                .min(limits.max_bindings_per_bind_group.saturating_sub(1)),
            timestamps,
            probe_budget: if info.device_type == wgpu::DeviceType::Cpu {
                CPU_PROBE_BUDGET
            } else {
                GPU_PROBE_BUDGET
            },
            lost,
            uncaptured,
            batch_layouts: Mutex::new(HashMap::new()),
            rehash_layouts: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            fixed_layouts: Mutex::new(HashMap::new()),
            fixed_modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// An error if the device was lost or an operation failed outside an error scope.
    pub fn check(&self) -> Result<()> {
        if let Some(m) = lock(&self.lost).clone() {
            return Err(device_error(m));
        }
        if let Some(m) = lock(&self.uncaptured).take() {
            return Err(device_error(m));
        }
        Ok(())
    }

    /// The most segments a table may have on this device: a batch binds `BATCH_FIXED - 1`
    /// storage buffers plus the key and value segments; a rehash `REHASH_FIXED - 1` plus the
    /// new table's segments.
    pub fn max_segments(&self) -> usize {
        (self.max_storage.saturating_sub(BATCH_FIXED - 1) / 2) as usize
    }

    /// Runs `f` inside out-of-memory and validation error scopes.
    pub fn scoped<T>(&self, what: &str, bytes: u64, f: impl FnOnce() -> T) -> Result<T> {
        let oom_scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = f();
        let val = pollster::block_on(val_scope.pop());
        let mem = pollster::block_on(oom_scope.pop());
        if mem.is_some() {
            return Err(oom(bytes));
        }
        if let Some(e) = val {
            return Err(device_error(format!("{what}: {e}")));
        }
        Ok(r)
    }

    /// A bind group of `layout` whose binding `i` is `resources[i]` (a whole buffer or a
    /// range of one).
    pub fn bind_buffers<'a>(
        &self,
        label: &str,
        layout: &wgpu::BindGroupLayout,
        resources: impl IntoIterator<Item = wgpu::BindingResource<'a>>,
    ) -> Result<wgpu::BindGroup> {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
            .into_iter()
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource,
            })
            .collect();
        self.scoped("bind group", 0, || {
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout,
                entries: &entries,
            })
        })
    }

    /// A buffer of `size` bytes (rounded up to 4), or `OutOfDeviceMemory`. A storage
    /// buffer is bound whole, so it may not be larger than a binding.
    pub fn buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        mapped: bool,
    ) -> Result<wgpu::Buffer> {
        let size = size.max(4).next_multiple_of(4);
        if size > self.max_binding.max(1 << 16) && usage.contains(wgpu::BufferUsages::STORAGE) {
            return Err(oom(size));
        }
        self.create_buffer(label, size, usage, mapped)
    }

    /// A storage buffer of `size` bytes (a multiple of 4) for the table's key or value
    /// segments, bound as ranges: up to [`max_buffer`](Self::max_buffer) bytes, zeroed, or
    /// `OutOfDeviceMemory`. It can be copied from (an export reads it back).
    pub fn table_buffer(&self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        use wgpu::BufferUsages as U;
        let size = size.max(4).next_multiple_of(4);
        if size > self.max_buffer {
            return Err(oom(size));
        }
        self.create_buffer(label, size, U::STORAGE | U::COPY_DST | U::COPY_SRC, false)
    }

    fn create_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        mapped: bool,
    ) -> Result<wgpu::Buffer> {
        self.scoped(label, size, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: mapped,
            })
        })
    }

    fn storage_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
        wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: false },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }
    }

    fn make_layout(&self, storage_from: u32, storage_count: u32) -> Result<Arc<Layout>> {
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        entries.extend((storage_from..storage_from + storage_count).map(Self::storage_entry));
        self.scoped("bind group layout", 0, || {
            let bgl = self
                .device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("vramkv"),
                    entries: &entries,
                });
            let pl = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some("vramkv"),
                    bind_group_layouts: &[Some(&bgl)],
                    immediate_size: 0,
                });
            Arc::new(Layout { bgl, pl })
        })
    }

    /// The layout of the batch kernels for `segs` segments.
    pub fn batch_layout(&self, segs: usize) -> Result<Arc<Layout>> {
        if let Some(l) = lock(&self.batch_layouts).get(&segs) {
            return Ok(l.clone());
        }
        let l = self.make_layout(1, BATCH_FIXED - 1 + 2 * segs as u32)?;
        lock(&self.batch_layouts).insert(segs, l.clone());
        Ok(l)
    }

    /// The layout of the rehash kernel into `segs` segments.
    pub fn rehash_layout(&self, segs: usize) -> Result<Arc<Layout>> {
        if let Some(l) = lock(&self.rehash_layouts).get(&segs) {
            return Ok(l.clone());
        }
        let l = self.make_layout(1, REHASH_FIXED - 1 + 2 * segs as u32)?;
        lock(&self.rehash_layouts).insert(segs, l.clone());
        Ok(l)
    }

    /// The layout of a fixed module's kernels.
    pub fn fixed_layout(&self, f: Fixed) -> Result<Arc<Layout>> {
        let mut l = lock(&self.fixed_layouts);
        if let Some(l) = l.get(&f) {
            return Ok(l.clone());
        }
        let made = self.make_layout(1, f.storage())?;
        l.insert(f, made.clone());
        Ok(made)
    }

    /// The kernel `entry` of a fixed module.
    pub fn fixed_pipeline(
        &self,
        f: Fixed,
        entry: &'static str,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline(PipeKey::Fixed(f, entry))
    }

    /// A shader module of `src`, in error scopes.
    fn module(&self, src: String) -> Result<wgpu::ShaderModule> {
        self.scoped("shader module", 0, || {
            self.device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some("vramkv"),
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                })
        })
    }

    /// The compute pipeline of `entry` in `module` with `layout`, cached under `key`.
    fn make_pipeline(
        &self,
        key: PipeKey,
        entry: &'static str,
        layout: &Layout,
        module: &wgpu::ShaderModule,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let p = self.scoped(entry, 0, || {
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&layout.pl),
                    module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                })
        })?;
        let p = Arc::new(p);
        lock(&self.pipelines).insert(key, p.clone());
        Ok(p)
    }

    fn pipeline(&self, key: PipeKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = lock(&self.pipelines).get(&key) {
            return Ok(p.clone());
        }
        let (flavour, segs, rehash, entry) = match key {
            PipeKey::Batch(segs, entry) => (Flavour::of(entry), segs, false, entry),
            PipeKey::Rehash(segs) => (Flavour::Plain, segs, true, "kv_rehash"),
            PipeKey::Fixed(f, entry) => {
                let layout = self.fixed_layout(f)?;
                let module = {
                    let mut m = lock(&self.fixed_modules);
                    match m.get(&f) {
                        Some(m) => m.clone(),
                        None => {
                            let made = self.module(f.source())?;
                            m.insert(f, made.clone());
                            made
                        }
                    }
                };
                return self.make_pipeline(key, entry, &layout, &module);
            }
        };
        let layout = if rehash {
            self.rehash_layout(segs)?
        } else {
            self.batch_layout(segs)?
        };
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(&(flavour, segs, rehash)) {
                Some(m) => m.clone(),
                None => {
                    let src = if rehash {
                        shader::rehash_module(segs)
                    } else {
                        shader::batch_module(segs, flavour)
                    };
                    let m = self.module(src)?;
                    modules.insert((flavour, segs, rehash), m.clone());
                    m
                }
            }
        };
        self.make_pipeline(key, entry, &layout, &module)
    }

    /// The batch kernel `entry` for a table of `segs` segments.
    pub fn batch_pipeline(
        &self,
        segs: usize,
        entry: &'static str,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline(PipeKey::Batch(segs, entry))
    }

    /// The rehash kernel into a table of `segs` segments.
    pub fn rehash_pipeline(&self, segs: usize) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline(PipeKey::Rehash(segs))
    }

    /// Workgroup counts for `n` threads: 1D up to the dimension limit, then folded into 2D.
    pub fn groups(&self, n: u64) -> (u32, u32) {
        let groups = n.div_ceil(shader::WORKGROUP as u64).max(1);
        let x = groups.min(self.max_groups as u64);
        (x as u32, groups.div_ceil(x) as u32)
    }

    /// Waits for submission `idx` (not a busy poll: the driver blocks until it is done).
    pub fn wait(&self, idx: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(idx),
                timeout: None,
            })
            .map_err(|e| device_error(format!("waiting for the GPU: {e}")))?;
        self.check()
    }
}
