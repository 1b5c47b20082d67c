//! Writes a copy of a llama GGUF model keeping only its first N transformer blocks (everything
//! else — metadata, tokenizer, embeddings, output norm and head — unchanged, `llama.block_count`
//! set to N). The GPU bundle carries such a copy of the default model so that it stays under its
//! size limit; both backends then run the same smaller model, so CUDA-vs-CPU checks keep their
//! meaning.
//!
//! Usage: cargo run --release --example trim_gguf -- IN OUT N_LAYERS

use qmtot::formats::gguf::{GgufFile, GgufWriter, MetaValue};

fn main() -> qmtot::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output, layers] = args.as_slice() else {
        eprintln!("usage: trim_gguf IN OUT N_LAYERS");
        std::process::exit(2);
    };
    let keep: usize = layers
        .parse()
        .map_err(|_| qmtot::Error::InvalidArgument(format!("N_LAYERS {layers:?} is not a number")))?;
    let src = GgufFile::open(input)?;
    let mut w = GgufWriter::new().version(src.version).alignment(src.alignment);
    for (k, v) in &src.metadata {
        let v = if k.ends_with(".block_count") {
            MetaValue::U32(keep as u32)
        } else {
            v.clone()
        };
        w.meta(k, v);
    }
    for t in &src.tensors {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        if layer.is_some_and(|l| l >= keep) {
            continue;
        }
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        w.tensor(&t.name, &shape, t.ty, src.tensor_data(t).to_vec())?;
    }
    w.write_to(output)?;
    eprintln!("wrote {output}: {keep} of the blocks of {input}");
    Ok(())
}
