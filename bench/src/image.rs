//! The large image the `transfer` and `mirror` suites move: how big it is and how it
//! splits into layers, set by the same two flags in both.

use anyhow::{Result, bail};
use clap::Args;

const MIB: u64 = 1024 * 1024;

/// `--size-mib` and `--layers` of a suite's large image.
#[derive(Args, Debug, Clone, Copy)]
pub struct ImageSize {
    /// Size of the large image in MiB, split evenly over --layers layers.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Layers of the large image.
    #[arg(long, default_value_t = 4)]
    pub layers: u64,
}

impl Default for ImageSize {
    fn default() -> Self {
        ImageSize {
            size_mib: 256,
            layers: 4,
        }
    }
}

impl ImageSize {
    /// The size of each layer in bytes: even, the first ones a byte larger where the
    /// total does not divide.
    pub fn layer_sizes(&self) -> Vec<u64> {
        let total = self.size_mib * MIB;
        (0..self.layers)
            .map(|i| total / self.layers + u64::from(i < total % self.layers))
            .collect()
    }

    /// Fails unless there is at least one layer and 1 MiB per layer; `suite` names the
    /// suite in the message.
    pub fn check(&self, suite: &str) -> Result<()> {
        if self.layers == 0 || self.size_mib < self.layers {
            bail!(
                "{suite} --size-mib {} --layers {}: expected at least one layer and 1 MiB per layer",
                self.size_mib,
                self.layers
            );
        }
        Ok(())
    }
}
