//! Compiling: turning a request (a block's decoded instructions) into host code and the
//! side tables it points into, on the caller's thread or on a thread of the compiler's
//! own. The result is position-independent bytes, installed into the code cache by the
//! hart's thread, which alone touches the cache and the block slots.

use super::emit::{self, BlockSpec, Emitter};
use super::Link;
use crate::block::MicroOp;
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Which block a request is for, as the block cache names it: the result is installed
/// only if the slot still holds this very block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockKey {
    pub(crate) slot: usize,
    pub(crate) pc: u64,
    pub(crate) page_ram_offset: usize,
    pub(crate) code_gen: u64,
    pub(crate) ram_id: u64,
}

impl BlockKey {
    /// What makes two blocks the same code: start, RAM page, code generation (the RAM
    /// itself is the same for every block the compiler holds).
    pub(crate) fn identity(&self) -> (u64, usize, u64) {
        (self.pc, self.page_ram_offset, self.code_gen)
    }
}

pub(crate) struct Request {
    pub(crate) key: BlockKey,
    /// The region: blocks of the key's page (start, decoded instructions), the key's
    /// block first.
    pub(crate) blocks: Vec<(u64, Vec<MicroOp>)>,
}

/// A compiled block, and what its code points into (kept as long as the code).
pub(crate) struct Compiled {
    pub(crate) key: BlockKey,
    /// `None`: the translator refused the block.
    pub(crate) code: Option<Vec<u8>>,
    _links: Box<[Link]>,
    _kept_ops: Box<[MicroOp]>,
    pub(crate) compile_ns: u64,
    /// Guest instructions in the region.
    pub(crate) instructions: u64,
}

// SAFETY: the raw pointers inside (`Link::target` is a code address, the code refers to
// the boxes by address) are plain data until the hart's thread installs the result; the
// boxes move with the value and their contents never do.
unsafe impl Send for Compiled {}

/// A Cranelift ISA for the host with the given optimisation level and register
/// allocator.
pub(super) fn host_isa(opt_level: &str, regalloc: &str) -> Option<OwnedTargetIsa> {
    let mut flags = settings::builder();
    flags.set("opt_level", opt_level).ok()?;
    flags.set("regalloc_algorithm", regalloc).ok()?;
    flags.set("enable_verifier", "false").ok()?;
    // Cranelift's tail calls (block to block) need frame pointers.
    flags.set("preserve_frame_pointers", "true").ok()?;
    cranelift_native::builder().ok()?.finish(settings::Flags::new(flags)).ok()
}

/// CPU time of the calling thread, in nanoseconds: what compiling costs, without the time
/// the thread waited for a core (wall time on a busy host says more about the host).
pub(super) fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given and nothing else.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// One compiler (ISA and reusable Cranelift state), on whatever thread owns it.
pub(super) struct Translator {
    isa: OwnedTargetIsa,
    emitter: Emitter,
}

impl Translator {
    /// What measured best on the boot and the workloads (see the module docs of `jit`):
    /// Cranelift's optimiser off, the backtracking register allocator.
    pub(super) fn new() -> Option<Translator> {
        Translator::with_settings("none", "backtracking")
    }

    pub(super) fn with_settings(opt_level: &str, regalloc: &str) -> Option<Translator> {
        let isa = host_isa(opt_level, regalloc)?;
        let emitter = Emitter::new(isa.default_call_conv());
        Some(Translator { isa, emitter })
    }

    pub(super) fn trampoline(&mut self) -> Option<Vec<u8>> {
        self.emitter.trampoline(&*self.isa).map(<[u8]>::to_vec)
    }

    pub(super) fn compile(&mut self, request: Request) -> Compiled {
        let started = thread_cpu_ns();
        let Request { key, blocks } = request;
        let ops = || blocks.iter().flat_map(|(_, ops)| ops.iter());
        let kept_ops: Box<[MicroOp]> = ops().filter(|op| emit::is_kept(op)).copied().collect();
        let kept_ptrs: Vec<*const MicroOp> = kept_ops.iter().map(|op| op as *const MicroOp).collect();
        // At most one linked exit per instruction, and one at the end of each block.
        let links: Box<[Link]> = (0..ops().count() + blocks.len())
            .map(|_| Link { target: 0, page: key.page_ram_offset >> crate::mem::PAGE_SHIFT, code_gen: key.code_gen })
            .collect();
        let mut next_link = 0;
        let mut new_link = || {
            let link = links.get(next_link)? as *const Link;
            next_link += 1;
            Some(link)
        };
        let region: Vec<(u64, &[MicroOp])> = blocks.iter().map(|(pc, ops)| (*pc, ops.as_slice())).collect();
        let block = BlockSpec {
            blocks: &region,
            pc: key.pc,
            page: key.page_ram_offset >> crate::mem::PAGE_SHIFT,
            code_gen: key.code_gen,
            kept_ops: &kept_ptrs,
        };
        let code = self.emitter.compile(&*self.isa, &block, &mut new_link).map(<[u8]>::to_vec);
        let instructions = ops().count() as u64;
        let compile_ns = thread_cpu_ns().saturating_sub(started);
        Compiled { key, code, _links: links, _kept_ops: kept_ops, compile_ns, instructions }
    }
}

/// Compiles at once, or hands requests to a thread of its own.
pub(super) enum Compiler {
    Inline(Translator),
    Thread {
        requests: Option<Sender<Request>>,
        results: Receiver<Compiled>,
        thread: Option<JoinHandle<()>>,
        /// Set when the compiler goes: the thread drops its queue instead of compiling it.
        closing: Arc<AtomicBool>,
        /// For the trampoline, made on the hart's thread.
        local: Translator,
    },
}

impl Compiler {
    pub(super) fn new(background: bool) -> Option<Compiler> {
        let local = Translator::new()?;
        if !background {
            return Some(Compiler::Inline(local));
        }
        let mut remote = Translator::new()?;
        let (request_tx, request_rx) = channel::<Request>();
        let (result_tx, result_rx) = channel();
        let closing = Arc::new(AtomicBool::new(false));
        let closing_seen = Arc::clone(&closing);
        let thread = std::thread::Builder::new()
            .name("rv64-jit".into())
            .spawn(move || {
                while let Ok(request) = request_rx.recv() {
                    // What is still queued when the hart goes would never run.
                    if closing_seen.load(Ordering::Relaxed) || result_tx.send(remote.compile(request)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(Compiler::Thread { requests: Some(request_tx), results: result_rx, thread: Some(thread), closing, local })
    }

    pub(super) fn trampoline(&mut self) -> Option<Vec<u8>> {
        match self {
            Compiler::Inline(t) => t.trampoline(),
            Compiler::Thread { local, .. } => local.trampoline(),
        }
    }

    /// Compile now (the result is returned), as an inline compiler does or when `here`
    /// says so, or queue for the thread (`None`).
    pub(super) fn submit(&mut self, request: Request, here: bool) -> Option<Compiled> {
        match self {
            Compiler::Inline(t) => Some(t.compile(request)),
            Compiler::Thread { local, .. } if here => Some(local.compile(request)),
            Compiler::Thread { requests, local, .. } => {
                let sent = requests.as_ref().map(|tx| tx.send(request));
                match sent {
                    Some(Ok(())) => None,
                    // The thread is gone (it cannot be, short of a panic): compile here.
                    Some(Err(e)) => Some(local.compile(e.0)),
                    None => unreachable!("requests close only on drop"),
                }
            }
        }
    }

    /// Results the thread has finished (none for an inline compiler).
    pub(super) fn finished(&mut self) -> Vec<Compiled> {
        match self {
            Compiler::Inline(_) => Vec::new(),
            Compiler::Thread { results, .. } => results.try_iter().collect(),
        }
    }
}

impl Drop for Compiler {
    fn drop(&mut self) {
        if let Compiler::Thread { requests, thread, closing, .. } = self {
            closing.store(true, Ordering::Relaxed);
            requests.take(); // the thread ends when its queue closes
            if let Some(thread) = thread.take() {
                let _ = thread.join();
            }
        }
    }
}
