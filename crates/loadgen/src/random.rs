//! Reproducible randomness: seeded generators, and the few distributions the simulator needs.
//!
//! Everything that shapes traffic (which organization a call belongs to, how long it lasts,
//! which deliveries are duplicated) comes from `--seed`, so a run can be repeated exactly.
//! Identifiers that must be unique across runs (call and organization ids) do not.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// SplitMix64: a fast, well-mixed 64-bit hash. Used to derive independent generators for
/// numbered items (the `i`th call) from one seed, so any item can be generated on its own, in
/// any order, by any task.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The generator for item `index` of stream `stream` under `seed`.
pub fn item_rng(seed: u64, stream: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(mix(mix(seed ^ mix(stream)) ^ index))
}

/// A standard normal sample (Box-Muller).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    // `1 - u` keeps the logarithm's argument in (0, 1].
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A log-normal sample with the given mean and shape `sigma` (the standard deviation of the
/// underlying normal). Call durations are well described by one: most calls are short, a few
/// run long.
pub fn log_normal(rng: &mut impl Rng, mean: f64, sigma: f64) -> f64 {
    let mu = mean.max(f64::MIN_POSITIVE).ln() - sigma * sigma / 2.0;
    (mu + sigma * standard_normal(rng)).exp()
}

/// `true` with probability `p`.
pub fn chance(rng: &mut impl Rng, p: f64) -> bool {
    p > 0.0 && rng.random::<f64>() < p
}

/// A random element of a non-empty slice (the first element for an empty range is never
/// needed; callers pass constant, non-empty tables).
pub fn pick<'a, T>(rng: &mut impl Rng, items: &'a [T]) -> &'a T {
    let index = rng.random_range(0..items.len().max(1));
    &items[index.min(items.len().saturating_sub(1))]
}

/// A UUID with the version-4 bits set, made from 128 random bits.
pub fn uuid_from(rng: &mut impl Rng) -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_generators_are_reproducible_and_independent() {
        let a: u64 = item_rng(7, 1, 42).random();
        let b: u64 = item_rng(7, 1, 42).random();
        let c: u64 = item_rng(7, 1, 43).random();
        let d: u64 = item_rng(7, 2, 42).random();
        let e: u64 = item_rng(8, 1, 42).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_ne!(a, e);
    }

    #[test]
    fn log_normal_has_roughly_the_requested_mean() {
        let mut rng = StdRng::seed_from_u64(1);
        let n = 200_000;
        let mean = (0..n).map(|_| log_normal(&mut rng, 180.0, 0.8)).sum::<f64>() / n as f64;
        assert!((mean - 180.0).abs() < 5.0, "mean {mean}");
    }

    #[test]
    fn chance_respects_its_extremes() {
        let mut rng = StdRng::seed_from_u64(3);
        assert!((0..1000).all(|_| !chance(&mut rng, 0.0)));
        assert!((0..1000).all(|_| chance(&mut rng, 1.0)));
    }
}
