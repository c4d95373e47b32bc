//! Fast elementwise math in plain arithmetic that the compiler turns into
//! vector code, and the [`vectorised!`](crate::cpu) dispatch: libm's `expf`
//! and `tanhf` are one call per element and were a sixth of a training step.

/// `e^x` within about 1 ulp, in plain arithmetic that the compiler turns
/// into vector code (libm's `expf` and `tanhf` are one call per element,
/// and were a sixth of a training step): Cody–Waite range reduction to
/// `2^n · e^f` with |f| ≤ ln 2 / 2, then a degree-7 Taylor polynomial.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let r = xc * LOG2_E + ROUND;
    let n = r - ROUND;
    let k = (r.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let f = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((k + 127) as u32) << 23);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        y
    }
}

/// `tanh(u) = 1 − 2 / (e^{2u} + 1)`, with [`exp_fast`].
#[inline(always)]
pub(crate) fn tanh_fast(u: f32) -> f32 {
    1.0 - 2.0 / (exp_fast(2.0 * u) + 1.0)
}

#[inline(always)]
fn exp_shifted_body(row: &mut [f32], m: f32) -> f32 {
    let mut z = 0f32;
    for x in row.iter_mut() {
        *x = exp_fast(*x - m);
    }
    for x in row.iter() {
        z += *x;
    }
    z
}

vectorised! {
    /// `row[j] ← e^(row[j] − m)`; returns their sum.
    pub(crate) fn exp_shifted(row: &mut [f32], m: f32) -> f32 = exp_shifted_body
}

#[inline(always)]
fn sum_exp_shifted_body(row: &[f32], m: f32) -> f32 {
    let mut z = 0f32;
    for x in row {
        z += exp_fast(*x - m);
    }
    z
}

vectorised! {
    /// `Σ_j e^(row[j] − m)`, leaving `row` as it is.
    pub(crate) fn sum_exp_shifted(row: &[f32], m: f32) -> f32 = sum_exp_shifted_body
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen running sums, so the loop vectorises (a single float sum
    // must keep its order and cannot).
    let mut s = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            s[i] += x[i] * y[i];
        }
    }
    let mut t: f32 = s.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        t += x * y;
    }
    t
}

vectorised! {
    /// `Σ a·b`.
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 = dot_body
}

#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

vectorised! {
    /// `y += a·x`.
    pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) = axpy_body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_tanh_are_within_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp_fast(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "exp: relative error {worst}");
        assert_eq!(exp_fast(-1e9), 0.0);
        assert_eq!(exp_fast(100.0), f32::INFINITY);
        let mut worst = 0f32;
        let mut u = -12.0f32;
        while u < 12.0 {
            worst = worst.max((tanh_fast(u) - u.tanh()).abs());
            u += 0.00113;
        }
        assert!(worst < 2e-7, "tanh: absolute error {worst}");
        let mut row = vec![0.5f32; 37];
        row[3] = -1e9;
        let z = exp_shifted(&mut row, 0.5);
        assert_eq!(row[3], 0.0);
        assert!((z - 36.0).abs() < 1e-5, "{z}");
    }
}
