//! GGUF writer: metadata and tensors into a valid GGUF v3 (or v2) image. Used by tests to
//! write tiny models and malformed files, and later by `qmtot quantize`.

use std::io::Write;
use std::path::Path;

use super::{GgmlType, MetaValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::error::{Error, Result};

struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Collects metadata and tensors, then writes them out in one go.
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the alignment and records it as `general.alignment` (u32).
    pub fn alignment(mut self, alignment: u64) -> Self {
        self.alignment = alignment;
        self.metadata.retain(|(k, _)| k.as_str() != "general.alignment");
        self.metadata
            .push(("general.alignment".into(), MetaValue::U32(alignment as u32)));
        self
    }

    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor. `shape` is row-major (outermost first, e.g. `[out, in]`); `data` is the
    /// raw encoded bytes of type `ty`.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, data: Vec<u8>) -> Result<&mut Self> {
        let n: u64 = shape.iter().map(|&d| d as u64).product();
        let want = ty.bytes_for(name, n)?;
        if data.len() as u64 != want {
            return Err(Error::BadTensor {
                tensor: name.to_string(),
                reason: format!(
                    "{} bytes given, {} expected for {shape:?} {}",
                    data.len(),
                    want,
                    ty.name()
                ),
            });
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
            data,
        });
        Ok(self)
    }

    /// f32 values as an F32 tensor.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<&mut Self> {
        self.tensor(name, shape, GgmlType::F32, bytemuck::cast_slice(values).to_vec())
    }

    /// The complete file image.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend_from_slice(&(v.ty() as u32).to_le_bytes());
            put_value(&mut out, v);
        }
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64);
        }
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            put_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&off.to_le_bytes());
        }
        out.resize(align(out.len() as u64) as usize, 0);
        let data_start = out.len();
        for (t, &off) in self.tensors.iter().zip(&offsets) {
            out.resize(data_start + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        out.resize(data_start + align((out.len() - data_start) as u64) as usize, 0);
        out
    }

    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        f.write_all(&self.to_bytes()).map_err(|e| Error::io(path, e))
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(elem, values) => {
            out.extend_from_slice(&(*elem as u32).to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                put_value(out, v);
            }
        }
    }
}
