// The emulated GPU's runtime: runs a kernel launch on the CPU. Blocks are spread over a
// persistent pool of worker threads (one block at a time per worker); a block's threads are
// fibers of its worker, run one at a time until each blocks at a barrier or a warp-collective
// call (or exits). So `__syncthreads` is a barrier, a warp's lanes meet at each shuffle and
// WMMA call, and the order in which threads run between barriers is a setting (forward,
// reverse, seeded shuffle) that tests vary to expose missing barriers.
//
// Checked here, each a launch error naming the kernel's file and line: threads that meet at
// different barriers, warp lanes that diverge at a collective call, a lane that exits while its
// warp waits for it, deadlock, and writes past the dynamic shared memory the launch asked for
// (guard bytes after it; the memory itself starts as 0xFF bytes, NaN in every float type, so a
// read of anything not written shows). The launch limits and the arguments are checked by the
// caller (crates/model, src/ops/launch.rs), the same way on a real GPU.
//
// Under SFT_EMU_TSAN and SFT_EMU_ASAN (scripts/kernel-sanitize) the fibers are announced to
// ThreadSanitizer and AddressSanitizer; this file itself is never instrumented, so only the
// kernels' own memory accesses are checked.
#include "sft_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifdef SFT_EMU_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#define TSAN_ACQUIRE(p) __tsan_acquire(p)
#define TSAN_RELEASE(p) __tsan_release(p)
#else
#define TSAN_ACQUIRE(p) ((void)0)
#define TSAN_RELEASE(p) ((void)0)
#endif

#ifdef SFT_EMU_ASAN
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif

#if defined(__x86_64__) && !defined(SFT_EMU_UCONTEXT)
// (SFT_EMU_UCONTEXT forces the portable ucontext path, as on other CPUs.)
// Saves the callee-saved registers, the SSE and x87 control words and the stack pointer of the
// running context into *from, and resumes the context saved at `to`.
asm(R"(
    .text
    .globl sft_emu_switch
    .type sft_emu_switch,@function
sft_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size sft_emu_switch,.-sft_emu_switch

    .globl sft_emu_fiber_start
    .type sft_emu_fiber_start,@function
sft_emu_fiber_start:
    movq %rbx, %rdi
    call sft_emu_lane_main
    ud2
    .size sft_emu_fiber_start,.-sft_emu_fiber_start
    .section .note.GNU-stack,"",@progbits
    .text
)");
extern "C" void sft_emu_switch(void** from, void* to);
extern "C" void sft_emu_fiber_start();
#else
#include <ucontext.h>
#endif

namespace {
// A suspended context (a fiber or a worker's scheduler), and the switch between two.
#if defined(__x86_64__) && !defined(SFT_EMU_UCONTEXT)
struct Ctx {
    void* sp = nullptr;
};
inline void jump(Ctx& from, Ctx& to) { sft_emu_switch(&from.sp, to.sp); }
#else
struct Ctx {
    ucontext_t uc;
};
inline void jump(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#endif
}  // namespace

namespace sft_emu {
thread_local Lane* cur = nullptr;

namespace {

enum State { READY, AT_BARRIER, AT_WARP, DONE };

struct Worker;

struct LaneState : Lane {
    int linear = 0, warp = 0, lane = 0;
    State state = READY;
    int bar_result = 0;
    char* stack = nullptr;
    size_t stack_size = 0;
    Ctx ctx;
#ifdef SFT_EMU_TSAN
    void* tsan = nullptr;
#endif
};

struct Warp {
    unsigned arrived = 0, mask = 0;
    const char* tag = nullptr;
    const char* file = nullptr;
    int line = 0;
    void (*action)(void**, unsigned) = nullptr;
    void* payloads[32];
};

struct Job {
    void (*invoke)(void**);
    void** args;
    uint3 grid, block;
    size_t smem;
};

std::atomic<int> g_schedule{0};  // 0 forward, 1 reverse, 2 shuffle
std::atomic<uint64_t> g_seed{0};
#ifdef SFT_EMU_TSAN
char g_launch_start, g_launch_end;
#endif

size_t page_size() {
    static size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
}

// Everything one worker thread needs to run blocks: its fibers' states and stacks, the
// block's barrier and warp state, its dynamic shared memory.
struct Worker {
    std::vector<LaneState> lanes;
    std::vector<Warp> warps;
    int n = 0, live = 0;
    // the block barrier being gathered
    int bar_arrived = 0, bar_or = 0, bar_and = 1, bar_count = 0;
    const char* bar_file = nullptr;
    int bar_line = 0;
    unsigned char* smem_buf = nullptr;  // SMEM_REGION bytes, 256-aligned
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    const Job* job = nullptr;
    bool failed = false;
    std::string error;
    // where the current meeting is (for errors raised by a collective's action)
    const char* site_file = nullptr;
    int site_line = 0;
    Ctx sched;
#ifdef SFT_EMU_TSAN
    void* sched_tsan = nullptr;
    char bar_sync = 0;
    // Consecutive blocks of a worker reuse its static shared memory: each block's threads
    // start after the previous block's ended (but not after each other).
    char block_sync[2] = {0, 0};
    uint64_t blocks_run = 0;
#endif
#ifdef SFT_EMU_ASAN
    const void* main_bottom = nullptr;
    size_t main_size = 0;
#endif

    Worker() {
        lanes.reserve(1024);
        warps.resize(32);
    }
    ~Worker() {
        std::free(smem_buf);
        for (auto& l : lanes)
            if (l.stack) munmap(l.stack, l.stack_size + page_size());
    }
};

thread_local Worker* t_worker = nullptr;

Worker& worker() {
    if (!t_worker) t_worker = new Worker();  // one per thread, for the thread's life
    return *t_worker;
}

LaneState& self() { return *static_cast<LaneState*>(cur); }

size_t stack_bytes() {
#if defined(SFT_EMU_ASAN) || defined(SFT_EMU_TSAN)
    return 1u << 20;
#else
    return 256u << 10;
#endif
}

std::string where(const char* file, int line) {
    if (!file) return "?";
    const char* base = std::strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// Switches from a lane back to its worker's scheduler.
void to_scheduler(LaneState& l, bool exiting) {
    Worker& w = worker();
#ifdef SFT_EMU_TSAN
    __tsan_switch_to_fiber(w.sched_tsan, 1);
#endif
#ifdef SFT_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, w.main_bottom, w.main_size);
#endif
    (void)exiting;
    jump(l.ctx, w.sched);
#ifdef SFT_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
}

// Ends the block with an error: the lane never runs again.
[[noreturn]] void abort_lane(const std::string& msg) {
    Worker& w = worker();
    if (!w.failed) {
        w.failed = true;
        LaneState& l = self();
        w.error = msg + format(" (thread (%u,%u,%u) of block (%u,%u,%u))", l.thread_idx.x,
                               l.thread_idx.y, l.thread_idx.z, l.block_idx.x, l.block_idx.y,
                               l.block_idx.z);
    }
    to_scheduler(self(), true);
    std::abort();  // never resumed
}

void release_barrier(Worker& w) {
    for (auto& l : w.lanes)
        if (l.state == AT_BARRIER) {
            l.state = READY;
            l.bar_result = 0;
        }
    w.bar_arrived = 0;
}

int barrier(int pred, int kind, const char* file, int line) {
    Worker& w = worker();
    LaneState& l = self();
    if (w.bar_arrived == 0) {
        w.bar_file = file;
        w.bar_line = line;
        w.bar_or = 0;
        w.bar_and = 1;
        w.bar_count = 0;
    } else if (w.bar_line != line || std::strcmp(w.bar_file, file) != 0) {
        abort_lane(format("__syncthreads: threads of one block wait at different barriers, %s and %s",
                          where(w.bar_file, w.bar_line).c_str(), where(file, line).c_str()));
    }
    w.bar_or |= pred != 0;
    w.bar_and &= pred != 0;
    w.bar_count += pred != 0;
    w.bar_arrived++;
    TSAN_RELEASE(&w.bar_sync);
    int result;
    if (w.bar_arrived == w.live) {
        result = kind == 0 ? w.bar_or : kind == 1 ? w.bar_and : w.bar_count;
        for (auto& o : w.lanes)
            if (o.state == AT_BARRIER) {
                o.state = READY;
                o.bar_result = result;
            }
        w.bar_arrived = 0;
    } else {
        l.state = AT_BARRIER;
        to_scheduler(l, false);
        result = l.bar_result;
    }
    TSAN_ACQUIRE(&w.bar_sync);
    return result;
}

void check_mask(Worker& w, LaneState& l, unsigned mask, const char* tag, const char* file, int line) {
    if (!((mask >> l.lane) & 1u))
        abort_lane(format("%s at %s: lane %d calls it with mask 0x%08x, which leaves it out", tag,
                          where(file, line).c_str(), l.lane, mask));
    int first = l.warp * 32;
    for (int i = 0; i < 32; ++i) {
        if (!((mask >> i) & 1u)) continue;
        if (first + i >= w.n)
            abort_lane(format("%s at %s: mask 0x%08x names lane %d, past the block's %d threads", tag,
                              where(file, line).c_str(), mask, i, w.n));
        if (w.lanes[first + i].state == DONE)
            abort_lane(format("%s at %s: mask 0x%08x names lane %d, which has exited", tag,
                              where(file, line).c_str(), mask, i));
    }
}

void meet(unsigned mask, const char* tag, bool same_site, const char* file, int line, void* payload,
          void (*action)(void**, unsigned)) {
    Worker& w = worker();
    LaneState& l = self();
    check_mask(w, l, mask, tag, file, line);
    Warp& wp = w.warps[l.warp];
    if (wp.arrived == 0) {
        wp.mask = mask;
        wp.tag = tag;
        wp.file = file;
        wp.line = line;
        wp.action = action;
        for (auto& p : wp.payloads) p = nullptr;
    } else if (wp.mask != mask || std::strcmp(wp.tag, tag) != 0 ||
               (same_site && (wp.line != line || std::strcmp(wp.file, file) != 0))) {
        abort_lane(format("warp %d diverged: lane %d calls %s at %s (mask 0x%08x) while lanes 0x%08x "
                          "wait at %s at %s (mask 0x%08x)",
                          l.warp, l.lane, tag, where(file, line).c_str(), mask, wp.arrived, wp.tag,
                          where(wp.file, wp.line).c_str(), wp.mask));
    }
    wp.payloads[l.lane] = payload;
    wp.arrived |= 1u << l.lane;
    TSAN_RELEASE(&wp);
    if (wp.arrived == wp.mask) {
        TSAN_ACQUIRE(&wp);
        if (wp.action) {
            w.site_file = file;
            w.site_line = line;
            wp.action(wp.payloads, mask);
            w.site_file = nullptr;
        }
        TSAN_RELEASE(&wp);
        int first = l.warp * 32;
        for (int i = 0; i < 32; ++i)
            if (((mask >> i) & 1u) && i != l.lane) w.lanes[first + i].state = READY;
        wp.arrived = 0;
    } else {
        l.state = AT_WARP;
        to_scheduler(l, false);
    }
    TSAN_ACQUIRE(&wp);
}

// A lane has exited: barriers and warp calls stop waiting for it (or fail, for a warp call
// that names it).
void lane_exited(Worker& w, LaneState& l) {
    l.state = DONE;
    w.live--;
    Warp& wp = w.warps[l.warp];
    if (wp.arrived != 0 && ((wp.mask >> l.lane) & 1u)) {
        w.failed = true;
        w.error = format("%s at %s: lane %d of warp %d exited while lanes 0x%08x of its mask 0x%08x "
                         "wait for it",
                         wp.tag, where(wp.file, wp.line).c_str(), l.lane, l.warp, wp.arrived, wp.mask);
    }
    if (w.bar_arrived > 0 && w.bar_arrived == w.live) release_barrier(w);
}

}  // namespace

void syncthreads(const char* file, int line) { barrier(0, 0, file, line); }
int syncthreads_or(int pred, const char* file, int line) { return barrier(pred, 0, file, line); }
int syncthreads_and(int pred, const char* file, int line) { return barrier(pred, 1, file, line); }
int syncthreads_count(int pred, const char* file, int line) { return barrier(pred, 2, file, line); }

void syncwarp(unsigned mask, const char* file, int line) {
    meet(mask, "__syncwarp", false, file, line, nullptr, nullptr);
}

void warp_meet(unsigned mask, const char* tag, const char* file, int line, void* payload,
               void (*action)(void**, unsigned)) {
    // WMMA calls must be converged (one call site); shuffles and __syncwarp need only the mask.
    bool same_site = std::strncmp(tag, "wmma::", 6) == 0;
    meet(mask, tag, same_site, file, line, payload, action);
}

unsigned char* dynamic_smem() { return worker().smem; }

void fail(const char* file, int line, const char* what) {
    Worker& w = worker();
    if (w.site_file) {
        file = w.site_file;
        line = w.site_line;
    }
    abort_lane(format("%s (%s)", what, where(file, line).c_str()));
}

}  // namespace sft_emu

using namespace sft_emu;

extern "C" void sft_emu_lane_main(LaneState* l) {
    Worker& w = worker();
#ifdef SFT_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &w.main_bottom, &w.main_size);
#endif
    TSAN_ACQUIRE(&g_launch_start);
#ifdef SFT_EMU_TSAN
    __tsan_acquire(&w.block_sync[(w.blocks_run + 1) & 1]);
#endif
    w.job->invoke(w.job->args);
#ifdef SFT_EMU_TSAN
    __tsan_release(&w.block_sync[w.blocks_run & 1]);
#endif
    TSAN_RELEASE(&g_launch_end);
    lane_exited(w, *l);
    to_scheduler(*l, true);
    std::abort();
}

namespace {

#if !defined(__x86_64__) || defined(SFT_EMU_UCONTEXT)
void ucontext_entry(unsigned lo, unsigned hi) {
    auto* l = reinterpret_cast<LaneState*>((static_cast<uintptr_t>(hi) << 32) | lo);
    sft_emu_lane_main(l);
}
#endif

void start_fiber(LaneState& l) {
    if (!l.stack) {
        size_t pg = page_size();
        l.stack_size = stack_bytes();
        void* m = mmap(nullptr, l.stack_size + pg, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "sft emulator: no memory for a fiber stack\n");
            std::abort();
        }
        mprotect(m, pg, PROT_NONE);  // a stack overflow faults instead of corrupting
        l.stack = static_cast<char*>(m);
    }
    char* bottom = l.stack + page_size();
#ifdef SFT_EMU_ASAN
    __asan_unpoison_memory_region(bottom, l.stack_size);
#endif
#if defined(__x86_64__) && !defined(SFT_EMU_UCONTEXT)
    auto top = reinterpret_cast<uintptr_t>(bottom + l.stack_size) & ~uintptr_t(15);
    auto* s = reinterpret_cast<uint64_t*>(top);
    s[-1] = reinterpret_cast<uint64_t>(&sft_emu_fiber_start);  // ret
    s[-2] = 0;                                                 // rbp
    s[-3] = reinterpret_cast<uint64_t>(&l);                    // rbx: the lane
    s[-4] = s[-5] = s[-6] = s[-7] = 0;                         // r12..r15
    uint32_t ctl[2] = {0x1f80u, 0x037fu};                      // mxcsr, x87 control word
    std::memcpy(&s[-8], ctl, 8);
    l.ctx.sp = &s[-8];
#else
    getcontext(&l.ctx.uc);
    l.ctx.uc.uc_stack.ss_sp = bottom;
    l.ctx.uc.uc_stack.ss_size = l.stack_size;
    l.ctx.uc.uc_link = nullptr;
    auto p = reinterpret_cast<uintptr_t>(&l);
    makecontext(&l.ctx.uc, reinterpret_cast<void (*)()>(ucontext_entry), 2,
                static_cast<unsigned>(p & 0xffffffffu), static_cast<unsigned>(p >> 32));
#endif
#ifdef SFT_EMU_TSAN
    if (!l.tsan) l.tsan = __tsan_create_fiber(0);
#endif
}

void resume(Worker& w, LaneState& l) {
    cur = &l;
#ifdef SFT_EMU_TSAN
    __tsan_switch_to_fiber(l.tsan, 1);
#endif
#ifdef SFT_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, l.stack + page_size(), l.stack_size);
#endif
    jump(w.sched, l.ctx);
#ifdef SFT_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    cur = nullptr;
}

uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// The most dynamic shared memory a block may have on an H100, and guard bytes past it.
constexpr size_t SMEM_REGION = 227 * 1024 + 4096;

#ifdef SFT_EMU_ASAN
constexpr bool ASAN = true;
#else
constexpr bool ASAN = false;
#endif

// Runs block `linear` of the job on this worker; false with w.error set on failure.
bool run_block(Worker& w, const Job& job, uint64_t linear) {
    uint3 bid{static_cast<unsigned>(linear % job.grid.x),
              static_cast<unsigned>((linear / job.grid.x) % job.grid.y),
              static_cast<unsigned>(linear / (static_cast<uint64_t>(job.grid.x) * job.grid.y))};
    int n = static_cast<int>(job.block.x * job.block.y * job.block.z);
    if (n < 1 || n > 1024 || job.smem > 227 * 1024) {
        w.error = format("a block of %d threads and %zu bytes of shared memory (a GPU runs 1 to "
                         "1024 threads, at most 227 KiB)", n, job.smem);
        return false;
    }
    w.job = &job;
    w.n = n;
    w.live = n;
    w.failed = false;
    w.error.clear();
    w.bar_arrived = 0;
    for (auto& wp : w.warps) wp.arrived = 0;
    // Dynamic shared memory: exactly the bytes asked for, filled with 0xFF. Under
    // AddressSanitizer a heap block of that size; otherwise the rest of the most a block can
    // have (227 KiB) and some guard bytes follow it, also 0xFF, checked after the block, so an
    // overrun is reported instead of corrupting the emulator.
    // Aligned as `extern __shared__ __align__(128)` is (and as WMMA needs).
    unsigned char* asan_smem = nullptr;
    if (ASAN) {
        void* p = nullptr;
        if (posix_memalign(&p, 256, job.smem ? job.smem : 1) != 0) std::abort();
        asan_smem = static_cast<unsigned char*>(p);
        std::memset(asan_smem, 0xff, job.smem);
        w.smem = job.smem ? asan_smem : nullptr;
    } else if (job.smem) {
        if (!w.smem_buf) {
            void* p = nullptr;
            if (posix_memalign(&p, 256, SMEM_REGION) != 0) std::abort();
            w.smem_buf = static_cast<unsigned char*>(p);
        }
        std::memset(w.smem_buf, 0xff, SMEM_REGION);
        w.smem = w.smem_buf;
    } else {
        w.smem = nullptr;
    }
    w.smem_bytes = job.smem;
#ifdef SFT_EMU_TSAN
    if (!w.sched_tsan) w.sched_tsan = __tsan_get_current_fiber();
#endif
    while (static_cast<int>(w.lanes.size()) < n) w.lanes.emplace_back();
    for (int i = 0; i < n; ++i) {
        LaneState& l = w.lanes[i];
        l.linear = i;
        l.warp = i / 32;
        l.lane = i % 32;
        l.state = READY;
        l.thread_idx = {static_cast<unsigned>(i % job.block.x),
                        static_cast<unsigned>((i / job.block.x) % job.block.y),
                        static_cast<unsigned>(i / (job.block.x * job.block.y))};
        l.block_idx = bid;
        l.block_dim = job.block;
        l.grid_dim = job.grid;
        start_fiber(l);
    }
    // Warp by warp: a warp runs until each of its lanes waits at a block barrier or has
    // exited (its lanes meet at shuffles and WMMA calls on the way), then the next warp runs.
    // Warps drift apart as on a GPU, so a read of shared memory that another warp has not
    // written yet (a missing barrier) reads 0xFF bytes or a stale tile.
    int nwarps = (n + 31) / 32, sched = g_schedule.load();
    std::vector<int> warp_order(nwarps);
    uint64_t rng = mix(g_seed.load() ^ mix(linear));
    auto shuffle = [&](std::vector<int>& v) {
        for (int i = static_cast<int>(v.size()) - 1; i > 0; --i) {
            rng = mix(rng);
            std::swap(v[i], v[rng % static_cast<uint64_t>(i + 1)]);
        }
    };
    for (int i = 0; i < nwarps; ++i) warp_order[i] = sched == 1 ? nwarps - 1 - i : i;
    std::vector<int> lane_order;
    while (!w.failed && w.live > 0) {
        bool progress = false;
        if (sched == 2) shuffle(warp_order);
        for (int wi : warp_order) {
            int first = wi * 32, count = std::min(32, n - first);
            lane_order.resize(count);
            for (int i = 0; i < count; ++i) lane_order[i] = first + (sched == 1 ? count - 1 - i : i);
            if (sched == 2) shuffle(lane_order);
            for (bool again = true; again && !w.failed;) {
                again = false;
                for (int i : lane_order) {
                    if (w.lanes[i].state != READY) continue;
                    progress = again = true;
                    resume(w, w.lanes[i]);
                    if (w.failed) break;
                }
            }
            if (w.failed) break;
        }
        if (w.failed || w.live == 0) break;
        if (!progress) {
            std::string m = format("deadlock in block (%u,%u,%u): ", bid.x, bid.y, bid.z);
            int at_bar = 0, exited = n - w.live;
            for (auto& l : w.lanes)
                if (l.state == AT_BARRIER) at_bar++;
            if (at_bar)
                m += format("%d threads wait at __syncthreads (%s); ", at_bar,
                            where(w.bar_file, w.bar_line).c_str());
            for (size_t k = 0; k * 32 < static_cast<size_t>(n); ++k)
                if (w.warps[k].arrived)
                    m += format("lanes 0x%08x of warp %zu wait at %s (%s) for mask 0x%08x; ",
                                w.warps[k].arrived, k, w.warps[k].tag,
                                where(w.warps[k].file, w.warps[k].line).c_str(), w.warps[k].mask);
            m += format("%d threads have exited", exited);
            w.failed = true;
            w.error = m;
        }
    }
    if (!w.failed && !ASAN && job.smem) {
        for (size_t i = job.smem; i < SMEM_REGION; ++i)
            if (w.smem_buf[i] != 0xff) {
                w.failed = true;
                w.error = format("block (%u,%u,%u) wrote past the %zu bytes of dynamic shared memory "
                                 "its launch asked for (at byte %zu)",
                                 bid.x, bid.y, bid.z, job.smem, i);
                break;
            }
    }
    std::free(asan_smem);
    w.smem = nullptr;
#ifdef SFT_EMU_TSAN
    w.blocks_run++;
#endif
    return !w.failed;
}

// The pool: workers wait for a job, then take blocks by an atomic counter until none is left
// or one block failed. The launching thread takes blocks too.
struct Pool {
    std::mutex m;
    std::condition_variable cv, done_cv;
    Job job{};
    uint64_t generation = 0, total = 0;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> stop{false};
    int busy = 0;
    std::string error;
    std::vector<std::thread> threads;

    explicit Pool(int n) {
        for (int i = 0; i < n; ++i) threads.emplace_back([this] { loop(); });
    }

    void work(const Job& j) {
        Worker& w = worker();
        for (;;) {
            if (stop.load()) return;
            uint64_t b = next.fetch_add(1);
            if (b >= total) return;
            if (!run_block(w, j, b)) {
                std::lock_guard<std::mutex> g(m);
                if (error.empty()) error = w.error;
                stop.store(true);
                return;
            }
        }
    }

    void loop() {
        uint64_t seen = 0;
        for (;;) {
            Job j;
            {
                std::unique_lock<std::mutex> g(m);
                cv.wait(g, [&] { return generation != seen; });
                seen = generation;
                j = job;
                busy++;
            }
            work(j);
            {
                std::lock_guard<std::mutex> g(m);
                busy--;
            }
            done_cv.notify_all();
        }
    }

    std::string run(const Job& j, uint64_t blocks) {
        {
            std::unique_lock<std::mutex> g(m);
            // A worker still leaving the previous launch finishes before this one starts.
            done_cv.wait(g, [&] { return busy == 0; });
            job = j;
            total = blocks;
            next.store(0);
            stop.store(false);
            error.clear();
            generation++;
        }
        if (blocks > 1) cv.notify_all();
        work(j);
        std::unique_lock<std::mutex> g(m);
        // Every worker that took this job has left it before the job goes out of scope.
        done_cv.wait(g, [&] { return busy == 0 && (next.load() >= total || stop.load()); });
        next.store(total);
        return error;
    }
};

int pool_threads() {
    if (const char* e = std::getenv("SFT_EMU_THREADS")) {
        int n = std::atoi(e);
        if (n >= 1) return n;
    }
    unsigned h = std::thread::hardware_concurrency();
    return h ? static_cast<int>(h) : 1;
}

std::mutex g_launch_mutex;

}  // namespace

extern "C" {

// Sets the order in which a block's threads run between barriers: 0 forward, 1 reverse,
// 2 a shuffle drawn from `seed` and the block's index.
void sft_emu_set_schedule(int kind, uint64_t seed) {
    g_schedule.store(kind);
    g_seed.store(seed);
}

// Runs `invoke(args)` as a grid of blocks. Returns 0, or 1 with the error in `err`.
int sft_emu_launch(void (*invoke)(void**), void** args, const uint32_t* grid, const uint32_t* block,
                   uint64_t smem, char* err, size_t errlen) {
    // One launch at a time, as on one stream.
    std::lock_guard<std::mutex> serial(g_launch_mutex);
    static Pool* pool = new Pool(pool_threads() - 1);
    Job job{invoke, args, {grid[0], grid[1], grid[2]}, {block[0], block[1], block[2]},
            static_cast<size_t>(smem)};
    uint64_t blocks = static_cast<uint64_t>(grid[0]) * grid[1] * grid[2];
    TSAN_RELEASE(&g_launch_start);
    std::string e = pool->run(job, blocks);
    TSAN_ACQUIRE(&g_launch_end);
    if (e.empty()) return 0;
    std::snprintf(err, errlen, "%s", e.c_str());
    return 1;
}
}
