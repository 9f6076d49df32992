//! The gRPC codec of every imgfleet service: prost, with small per-RPC
//! buffers.
//!
//! tonic allocates its encode and decode buffers eagerly, once per RPC, at
//! 8 KiB each by default. A hub holds one long-lived `AgentService.Connect`
//! stream per agent, and agent messages are a few hundred bytes, so at ten
//! thousand agents the default costs 160 MiB of mostly empty buffers. 1 KiB
//! start buffers grow on demand (in 1 KiB steps, amortised by the allocator)
//! for the rare large message.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of each per-RPC buffer.
const BUFFER_SIZE: usize = 1024;
/// How much a streaming response batches before yielding (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with [`BUFFER_SIZE`] buffers; named in build.rs.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec { _pd: PhantomData }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
