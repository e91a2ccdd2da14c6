#!/usr/bin/env python3
"""Generate fp_vectors.txt: F/D test vectors computed by Berkeley SoftFloat 3e with
its RISC-V specialization (the softfloatpy package: `pip install softfloatpy`), the
library the reference simulator uses. tests/fp_vectors.rs runs each one on the hart.

Line format (hex, no prefix):  <op> <rm> <a> <b> <c> <result> <fflags>
  rm is 0..4 (RNE RTZ RDN RUP RMM) or '-' for ops without one; a/b/c are the raw
  operands (a single's 32 bits; an integer register for fcvt.<f>.<int>), result is
  the raw float bits or the integer register value.

Usage: fp_vectors.py [count-per-case] [seed] > fp_vectors.txt
"""

import random
import sys
from fractions import Fraction

import softfloatpy as sf

RMS = [sf.RoundingMode.NEAR_EVEN, sf.RoundingMode.MIN_MAG, sf.RoundingMode.MIN,
       sf.RoundingMode.MAX, sf.RoundingMode.NEAR_MAX_MAG]


class Fmt:
    def __init__(self, name, exp_bits, frac_bits, cls):
        self.name, self.e, self.f, self.cls = name, exp_bits, frac_bits, cls
        self.bits = 1 + exp_bits + frac_bits
        self.emax_field = (1 << exp_bits) - 1
        self.bias = (1 << (exp_bits - 1)) - 1
        self.sign = 1 << (self.bits - 1)
        self.p = frac_bits + 1

    def make(self, bits):
        return self.cls.from_bytes(bits.to_bytes(self.bits // 8, 'big'))

    def raw(self, x):
        return int.from_bytes(x.to_bytes(), 'big')

    def pack(self, sign, exp, frac):
        return (self.sign if sign else 0) | (exp << self.f) | frac

    def specials(self):
        one = self.bias << self.f
        vals = [0, 1, (1 << self.f) - 1, 1 << self.f, (self.emax_field - 1) << self.f | ((1 << self.f) - 1),
                self.emax_field << self.f, (self.emax_field << self.f) | (1 << (self.f - 1)),
                (self.emax_field << self.f) | (1 << (self.f - 1)) | 5, (self.emax_field << self.f) | 1,
                one, one | (1 << (self.f - 1)), one - (1 << self.f), one + 1, one - 1, (self.bias + 1) << self.f]
        return vals + [v | self.sign for v in vals]

    def random(self, rng):
        if rng.random() < 0.15:
            return rng.choice(self.specials())
        r = rng.random()
        if r < 0.35:
            exp = self.bias + rng.randint(-3, 3)
        elif r < 0.5:
            exp = rng.randint(0, 3)
        elif r < 0.65:
            exp = self.emax_field - 1 - rng.randint(0, 3)
        else:
            exp = rng.randint(0, self.emax_field - 1)
        frac = rng.getrandbits(self.f)
        if rng.random() < 0.3:
            frac &= ~((1 << (self.f - rng.randint(1, 6))) - 1)
        return self.pack(rng.random() < 0.5, exp, frac)


S = Fmt('s', 8, 23, sf.Float32)
D = Fmt('d', 11, 52, sf.Float64)


def run(fn):
    sf.set_exception_flags(0)
    result = fn()
    return result, int(sf.get_exception_flags())


def arith_cases(fmt, rng, n, out):
    ops = {
        'fadd': lambda a, b, c: fmt.cls.add(a, b),
        'fsub': lambda a, b, c: fmt.cls.sub(a, b),
        'fmul': lambda a, b, c: fmt.cls.mul(a, b),
        'fdiv': lambda a, b, c: fmt.cls.div(a, b),
        'fsqrt': lambda a, b, c: a.sqrt(),
        'fmadd': lambda a, b, c: fmt.cls.mul_add(a, b, c),
        'fmsub': lambda a, b, c: fmt.cls.mul_add(a, b, c.neg()),
        'fnmsub': lambda a, b, c: fmt.cls.mul_add(a.neg(), b, c),
        'fnmadd': lambda a, b, c: fmt.cls.mul_add(a.neg(), b, c.neg()),
    }
    for name, fn in ops.items():
        for rm in range(5):
            sf.set_rounding_mode(RMS[rm])
            for _ in range(n):
                a, b, c = fmt.random(rng), fmt.random(rng), fmt.random(rng)
                if name in ('fmul', 'fdiv', 'fmadd', 'fnmadd') and rng.random() < 0.3:
                    # Aim the exponent of the result at the underflow or overflow end.
                    a, b = near_boundary(fmt, rng, name == 'fdiv')
                r, flags = run(lambda: fn(fmt.make(a), fmt.make(b), fmt.make(c)))
                out.append((f'{name}.{fmt.name}', rm, a, b, c, fmt.raw(r), flags))


def near_boundary(fmt, rng, div):
    ea = rng.randint(1, fmt.emax_field - 1)
    target = rng.choice([1, 2, fmt.emax_field - 1, fmt.emax_field]) + rng.randint(-2, 1)
    eb = target + fmt.bias - ea if not div else ea - target + fmt.bias
    eb = max(0, min(fmt.emax_field - 1, eb))
    return (fmt.pack(rng.random() < 0.3, ea, rng.getrandbits(fmt.f)),
            fmt.pack(rng.random() < 0.3, eb, rng.getrandbits(fmt.f)))


def tininess_window_cases(fmt, rng, n, out):
    """Products that round to exactly 2^emin on the subnormal grid while their value
    rounded with an unbounded exponent stays below 2^emin: (1 - 2j 2^-p)(1 + j 2^-(p-1))
    = 1 - j^2 2^(2-2p), inside the window when j^2 lies in (2^(p-3), 2^(p-2))."""
    lo, hi = isqrt(1 << (fmt.p - 3)) + 1, isqrt(1 << (fmt.p - 2))
    for rm in range(5):
        sf.set_rounding_mode(RMS[rm])
        for _ in range(n):
            j = rng.randint(lo, hi)
            a = fmt.pack(False, fmt.bias - 1, (1 << fmt.f) - 2 * j)  # 1 - 2j 2^-p
            b = fmt.pack(False, 1, j)  # 2^emin (1 + j 2^-(p-1))
            neg = rng.random() < 0.5
            a |= fmt.sign if neg else 0
            for name, fn in (('fmul', lambda x, y: fmt.cls.mul(x, y)),
                             ('fmadd', lambda x, y: fmt.cls.mul_add(x, y, fmt.make(0)))):
                r, flags = run(lambda: fn(fmt.make(a), fmt.make(b)))
                out.append((f'{name}.{fmt.name}', rm, a, b, 0, fmt.raw(r), flags))


def isqrt(n):
    x = int(n ** 0.5)
    while x * x > n:
        x -= 1
    while (x + 1) * (x + 1) <= n:
        x += 1
    return x


INT_KINDS = {'w': (32, True), 'wu': (32, False), 'l': (64, True), 'lu': (64, False)}


def sext(v, bits):
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def to_int_cases(fmt, rng, n, out):
    for kind, (bits, signed) in INT_KINDS.items():
        conv = getattr(sf, f'f{fmt.bits}_to_{"i" if signed else "ui"}{bits}')
        for rm in range(5):
            for _ in range(n):
                a = fmt.random(rng)
                if rng.random() < 0.6:
                    # Values near the integer range's ends and near small halves.
                    e = rng.choice([0, 1, 2, bits - 2, bits - 1, bits, bits + 1, rng.randint(-3, 70)])
                    exp = max(1, min(fmt.emax_field - 1, fmt.bias + e))
                    frac = rng.getrandbits(fmt.f) if rng.random() < 0.5 else rng.choice([0, 1, (1 << fmt.f) - 1, 1 << (fmt.f - 1)])
                    a = fmt.pack(rng.random() < 0.5, exp, frac)
                r, flags = run(lambda: conv(fmt.make(a), RMS[rm], True))
                value = sext(int(r.to_int()), bits) & ((1 << 64) - 1)  # 32-bit results are sign-extended
                out.append((f'fcvt.{kind}.{fmt.name}', rm, a, 0, 0, value, flags))


def from_int_cases(fmt, rng, n, out):
    for kind, (bits, signed) in INT_KINDS.items():
        ty = getattr(sf, f'{"Int" if signed else "UInt"}{bits}')
        conv = getattr(sf, f'{"i" if signed else "ui"}{bits}_to_f{fmt.bits}')
        for rm in range(5):
            sf.set_rounding_mode(RMS[rm])
            for _ in range(n):
                width = rng.randint(1, bits)
                v = rng.getrandbits(width)
                if rng.random() < 0.3:
                    v |= 1 << (width - 1)
                    v |= 1  # odd and long: inexact, often a tie
                v &= (1 << bits) - 1
                value = sext(v, bits) if signed else v
                reg = rng.getrandbits(64) if bits == 32 else 0  # upper bits must be ignored
                reg = (reg & ~0xffffffff) | (v & 0xffffffff) if bits == 32 else v
                r, flags = run(lambda: conv(ty.from_int(value)))
                out.append((f'fcvt.{fmt.name}.{kind}', rm, reg, 0, 0, fmt.raw(r), flags))


def compare_cases(fmt, rng, n, out):
    ops = {'feq': fmt.cls.eq, 'flt': fmt.cls.lt, 'fle': fmt.cls.le}
    for name, fn in ops.items():
        for _ in range(n):
            a = fmt.random(rng)
            b = rng.choice([a, a ^ fmt.sign, fmt.random(rng), fmt.random(rng)])
            r, flags = run(lambda: fn(fmt.make(a), fmt.make(b)))
            out.append((f'{name}.{fmt.name}', '-', a, b, 0, int(bool(r)), flags))


def convert_fmt_cases(rng, n, out):
    for rm in range(5):
        sf.set_rounding_mode(RMS[rm])
        for i in range(n):
            a = D.random(rng)
            if i % 3 == 0:
                # Around the single range's ends, including the tininess window.
                e = rng.choice([-150, -149, -127, -126, -125, 126, 127, 128])
                a = D.pack(rng.random() < 0.5, D.bias + e, rng.getrandbits(D.f))
            if i % 10 == 0:
                x = Fraction(1, 2 ** 126) * (1 - Fraction(1, 2 ** 24) + Fraction(rng.randint(1, 2 ** 20), 2 ** 46))
                a = D.raw(sf.Float64.from_float(float(x)))
            r, flags = run(lambda: sf.f64_to_f32(D.make(a)))
            out.append(('fcvt.s.d', rm, a, 0, 0, S.raw(r), flags))
    for _ in range(n):
        a = S.random(rng)
        r, flags = run(lambda: sf.f32_to_f64(S.make(a)))
        out.append(('fcvt.d.s', 0, a, 0, 0, D.raw(r), flags))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 2024)
    sf.set_tininess_mode(sf.TininessMode.AFTER_ROUNDING)
    out = []
    for fmt in (S, D):
        arith_cases(fmt, rng, n, out)
        tininess_window_cases(fmt, rng, max(2, n // 4), out)
        to_int_cases(fmt, rng, n, out)
        from_int_cases(fmt, rng, n // 2, out)
        compare_cases(fmt, rng, n * 2, out)
    convert_fmt_cases(rng, n * 2, out)
    print(f'# generated by fp_vectors.py {n} (Berkeley SoftFloat 3e, RISC-V specialization)')
    for op, rm, a, b, c, r, flags in out:
        print(f'{op} {rm} {a:x} {b:x} {c:x} {r:x} {flags:x}')


if __name__ == '__main__':
    main()
