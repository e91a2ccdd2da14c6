//! The hart against Berkeley SoftFloat (RISC-V specialization): every vector in
//! fp_vectors.txt (made by fp_vectors.py) runs as one instruction, and the result
//! register and fflags must match. Every other vector uses the dynamic rounding mode
//! (rm = DYN with fcsr.frm set), the rest the static one.
//!
//! FP_VECTORS=<path> runs another vector file (e.g. a larger one made locally).

mod fp_common;

use fp_common::*;

struct Vector {
    line: usize,
    op: String,
    rm: u32,
    a: u64,
    b: u64,
    c: u64,
    result: u64,
    flags: u64,
}

fn parse(text: &str) -> Vec<Vector> {
    let hex = |s: &str| u64::from_str_radix(s, 16).expect("hex field");
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty())
        .map(|(n, l)| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 7, "line {}: {l}", n + 1);
            Vector {
                line: n + 1,
                op: f[0].to_string(),
                rm: if f[1] == "-" { 0 } else { f[1].parse().expect("rm") },
                a: hex(f[2]),
                b: hex(f[3]),
                c: hex(f[4]),
                result: hex(f[5]),
                flags: hex(f[6]),
            }
        })
        .collect()
}

/// Where a vector's operands come from and its result goes.
#[derive(Clone, Copy)]
enum Route {
    /// f2, f3, f4 in `src` format to f1 in `dst` format.
    Float { src: u32, dst: u32 },
    /// f2 in `src` format to x1.
    ToInt { src: u32 },
    /// x2 to f1 in `dst` format.
    FromInt { dst: u32 },
}

fn fmt_of(s: &str) -> u32 {
    match s {
        "s" => S,
        "d" => D,
        _ => panic!("format {s}"),
    }
}

fn int_of(s: &str) -> u32 {
    match s {
        "w" => W,
        "wu" => WU,
        "l" => L,
        "lu" => LU,
        _ => panic!("integer type {s}"),
    }
}

/// The instruction (rd = 1, rs1 = 2, rs2 = 3, rs3 = 4) and its routing.
fn encode(op: &str, rm: u32) -> (u32, Route) {
    let parts: Vec<&str> = op.split('.').collect();
    let float = |f: u32| Route::Float { src: f, dst: f };
    match parts.as_slice() {
        ["fcvt", "s", "d"] => (fcvt_s_d(1, 2, rm), Route::Float { src: D, dst: S }),
        ["fcvt", "d", "s"] => (fcvt_d_s(1, 2, rm), Route::Float { src: S, dst: D }),
        ["fcvt", to, from] if *from == "s" || *from == "d" => {
            (fcvt_int_f(int_of(to), fmt_of(from), 1, 2, rm), Route::ToInt { src: fmt_of(from) })
        }
        ["fcvt", to, from] => (fcvt_f_int(fmt_of(to), int_of(from), 1, 2, rm), Route::FromInt { dst: fmt_of(to) }),
        [name, f] => {
            let f = fmt_of(f);
            match *name {
                "fadd" => (fadd(f, 1, 2, 3, rm), float(f)),
                "fsub" => (fsub(f, 1, 2, 3, rm), float(f)),
                "fmul" => (fmul(f, 1, 2, 3, rm), float(f)),
                "fdiv" => (fdiv(f, 1, 2, 3, rm), float(f)),
                "fsqrt" => (fsqrt(f, 1, 2, rm), float(f)),
                "fmadd" => (fma(MADD, f, 1, 2, 3, 4, rm), float(f)),
                "fmsub" => (fma(MSUB, f, 1, 2, 3, 4, rm), float(f)),
                "fnmsub" => (fma(NMSUB, f, 1, 2, 3, 4, rm), float(f)),
                "fnmadd" => (fma(NMADD, f, 1, 2, 3, 4, rm), float(f)),
                "feq" => (feq(f, 1, 2, 3), Route::ToInt { src: f }),
                "flt" => (flt(f, 1, 2, 3), Route::ToInt { src: f }),
                "fle" => (fle(f, 1, 2, 3), Route::ToInt { src: f }),
                _ => panic!("unknown op {name}"),
            }
        }
        _ => panic!("unknown op {op}"),
    }
}

fn reg(fmt: u32, bits: u64) -> u64 {
    if fmt == S {
        box_s(bits as u32)
    } else {
        bits
    }
}

/// Run one vector; a description of the mismatch, if any.
fn check(m: &mut Machine, v: &Vector, dynamic: bool) -> Option<String> {
    let takes_rm = !matches!(&v.op[..], "feq.s" | "feq.d" | "flt.s" | "flt.d" | "fle.s" | "fle.d");
    let (word, route) = encode(&v.op, if dynamic && takes_rm { DYN } else { v.rm });
    m.hart.state.fcsr = (v.rm as u64) << 5;
    m.hart.state.f[1] = 0x1234;
    m.hart.state.x[1] = 0x1234;
    let got = match route {
        Route::Float { src, dst } => {
            m.hart.state.f[2..5].copy_from_slice(&[reg(src, v.a), reg(src, v.b), reg(src, v.c)]);
            m.run(&[word]);
            (m.hart.state.f[1], reg(dst, v.result))
        }
        Route::ToInt { src } => {
            m.hart.state.f[2..4].copy_from_slice(&[reg(src, v.a), reg(src, v.b)]);
            m.run(&[word]);
            (m.hart.state.x[1], v.result)
        }
        Route::FromInt { dst } => {
            m.hart.state.x[2] = v.a;
            m.run(&[word]);
            (m.hart.state.f[1], reg(dst, v.result))
        }
    };
    let (value, want) = got;
    let flags = m.fflags();
    (m.trapped().is_some() || value != want || flags != v.flags).then(|| {
        format!(
            "line {}: {} rm={} dyn={dynamic} a={:#x} b={:#x} c={:#x}: got {value:#x} flags {flags:#x} trap {:?}, want {want:#x} flags {:#x}",
            v.line, v.op, v.rm, v.a, v.b, v.c, m.trapped(), v.flags
        )
    })
}

#[test]
fn hart_matches_berkeley_softfloat_vectors() {
    let text = match std::env::var("FP_VECTORS") {
        Ok(path) => std::fs::read_to_string(path).expect("FP_VECTORS file"),
        Err(_) => include_str!("fp_vectors.txt").to_string(),
    };
    let vectors = parse(&text);
    assert!(vectors.len() > 1000, "too few vectors: {}", vectors.len());
    let mut m = Machine::new();
    let failures: Vec<String> = vectors.iter().enumerate().filter_map(|(n, v)| check(&mut m, v, n % 2 == 1)).collect();
    for f in failures.iter().take(30) {
        eprintln!("{f}");
    }
    assert!(failures.is_empty(), "{} of {} vectors failed", failures.len(), vectors.len());
}
