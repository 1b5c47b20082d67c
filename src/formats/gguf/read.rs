//! GGUF reader: parses and validates the header, metadata and tensor infos of a memory-mapped
//! file (or an in-memory buffer), and hands out tensor data. Every malformed input is a typed
//! [`Error`]; nothing here panics on file contents.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};

use super::blocks::{dequant_block_q4_0, dequant_block_q4_1, dequant_block_q8_0, q4_to_int4, q8_0_to_int8};
use super::{ggml_type_name, GgmlType, MetaType, MetaValue, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use crate::error::{Error, Result};
use crate::quant::{DenseMatrix, WeightMatrix};

/// ggml's limit on tensor rank.
const MAX_DIMS: u32 = 4;
/// Deepest array nesting accepted (the format allows arrays of arrays; a crafted file must not
/// be able to overflow the stack).
const MAX_ARRAY_DEPTH: usize = 8;

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major order (outermost first), e.g. `[out, in]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file.
pub struct GgufFile {
    bytes: Bytes,
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
}

/// Bounds-checked little-endian reader over the header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(Error::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::BadMetadata(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<MetaValue> {
        let t = MetaType::from_id(ty).ok_or_else(|| Error::UnknownMetaType {
            key: key.to_string(),
            ty,
        })?;
        let what = || format!("value of {key:?}");
        Ok(match t {
            MetaType::U8 => MetaValue::U8(self.array::<1>(&what())?[0]),
            MetaType::I8 => MetaValue::I8(self.array::<1>(&what())?[0] as i8),
            MetaType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&what())?)),
            MetaType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&what())?)),
            MetaType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(&what())?)),
            MetaType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&what())?)),
            MetaType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&what())?)),
            MetaType::Bool => match self.array::<1>(&what())?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(Error::BadMetadata(format!("{key:?}: bool byte {b}"))),
            },
            MetaType::String => MetaValue::String(self.string(&what())?),
            MetaType::U64 => MetaValue::U64(self.u64(&what())?),
            MetaType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&what())?)),
            MetaType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&what())?)),
            MetaType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(Error::BadMetadata(format!(
                        "{key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem_id = self.u32(&what())?;
                let elem = MetaType::from_id(elem_id).ok_or_else(|| Error::UnknownMetaType {
                    key: key.to_string(),
                    ty: elem_id,
                })?;
                let count = self.u64(&what())?;
                // Every element takes at least one byte: a count beyond the bytes left is a
                // truncated (or lying) file, caught before any allocation.
                let remaining = (self.buf.len() - self.pos) as u64;
                if count > remaining {
                    return Err(Error::Truncated {
                        what: format!("{count} array elements of {key:?}"),
                        offset: self.pos as u64,
                        needed: count,
                        len: self.buf.len() as u64,
                    });
                }
                let mut values = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    values.push(self.value(key, elem_id, depth + 1)?);
                }
                MetaValue::Array(elem, values)
            }
        })
    }
}

impl GgufFile {
    /// Memory-map and parse a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; qmtot never writes model files, and a file truncated
        // by another process while mapped is outside what any mmap-based loader can defend.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(Bytes::Mapped(map))
    }

    /// Parse a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Self> {
        let mut c = Cursor { buf: &bytes, pos: 0 };
        let magic: [u8; 4] = c.array("magic")?;
        if magic != GGUF_MAGIC {
            return Err(Error::BadMagic { found: magic });
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedGgufVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;

        let mut metadata = Vec::new();
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of {key:?}"))?;
            let value = c.value(&key, ty, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(Error::BadMetadata(format!("duplicate key {key:?}")));
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match metadata[i].1.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
                _ => {
                    return Err(Error::BadMetadata(format!(
                        "general.alignment {:?} is not a power of two",
                        metadata[i].1
                    )))
                }
            },
        };

        let mut tensors = Vec::new();
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let n_dims = c.u32(&format!("rank of {name:?}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::BadTensor {
                    tensor: name,
                    reason: format!("rank {n_dims} is outside 1..={MAX_DIMS}"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&format!("dims of {name:?}"))?);
            }
            let ty_id = c.u32(&format!("type of {name:?}"))?;
            let offset = c.u64(&format!("offset of {name:?}"))?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| Error::UnsupportedTensorType {
                tensor: name.clone(),
                ty: ty_id,
                ty_name: ggml_type_name(ty_id).to_string(),
            })?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| Error::BadTensor {
                    tensor: name.clone(),
                    reason: format!("dims {dims:?} are empty or overflow"),
                })?;
            // Quantized types need whole blocks along each row.
            if dims[0] % ty.block_elems() as u64 != 0 {
                return Err(Error::BadTensor {
                    tensor: name,
                    reason: format!(
                        "row length {} is not a multiple of the {} block of {}",
                        dims[0],
                        ty.name(),
                        ty.block_elems()
                    ),
                });
            }
            let nbytes = ty.bytes_for(&name, elements)?;
            if offset % alignment != 0 {
                return Err(Error::BadTensor {
                    tensor: name,
                    reason: format!("offset {offset} is not a multiple of the alignment {alignment}"),
                });
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::BadTensor {
                    tensor: name,
                    reason: "duplicate tensor name".into(),
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                nbytes,
            });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (bytes.len() as u64).saturating_sub(data_offset);
        for t in &tensors {
            if t.offset > data_len {
                return Err(Error::TensorOffsetOutOfBounds {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    data_len,
                });
            }
            let end = t.offset.saturating_add(t.nbytes);
            if end > data_len {
                return Err(Error::TruncatedTensorData {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    end,
                    data_len,
                });
            }
        }

        Ok(GgufFile {
            bytes,
            version,
            alignment,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            data_offset,
        })
    }

    // ---- metadata -----------------------------------------------------------------------

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&MetaValue> {
        self.get(key).ok_or_else(|| Error::MissingMetadata(key.to_string()))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.require(key)?.as_u64().ok_or(Error::MetadataType {
            key: key.to_string(),
            expected: "a non-negative integer",
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.require(key)?.as_f64().ok_or(Error::MetadataType {
            key: key.to_string(),
            expected: "a number",
        })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.require(key)?.as_str().ok_or(Error::MetadataType {
            key: key.to_string(),
            expected: "a string",
        })
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue]> {
        self.require(key)?.as_array().ok_or(Error::MetadataType {
            key: key.to_string(),
            expected: "an array",
        })
    }

    // ---- tensors --------------------------------------------------------------------------

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// Raw bytes of a tensor (bounds were checked at parse time).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.bytes[start..start + t.nbytes as usize]
    }

    /// Any supported tensor as f32 in row-major order, by the GGUF dequant formulas.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.require_tensor(name)?;
        let data = self.tensor_data(t);
        let n = t.elements() as usize;
        let mut out = Vec::with_capacity(n);
        match t.ty {
            GgmlType::F32 => out.extend(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            GgmlType::F16 => out.extend(data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
            GgmlType::BF16 => out.extend(data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                let dequant = match t.ty {
                    GgmlType::Q4_0 => dequant_block_q4_0,
                    GgmlType::Q4_1 => dequant_block_q4_1,
                    _ => dequant_block_q8_0,
                };
                let mut block = [0f32; 32];
                for b in data.chunks_exact(t.ty.block_bytes()) {
                    dequant(b, &mut block);
                    out.extend_from_slice(&block);
                }
            }
        }
        Ok(out)
    }

    /// A 2-D tensor as a linear weight `W[out, in]` in its lossless host form: Q4_0/Q4_1 →
    /// canonical INT4 (group 32), Q8_0 → grouped INT8, float types → dense f32.
    pub fn weight_matrix(&self, name: &str) -> Result<WeightMatrix> {
        let t = self.require_tensor(name)?;
        if t.dims.len() != 2 {
            return Err(Error::BadTensor {
                tensor: name.to_string(),
                reason: format!("expected a matrix, found dims {:?}", t.dims),
            });
        }
        let (cols, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        let data = self.tensor_data(t);
        Ok(match t.ty {
            GgmlType::Q4_0 => WeightMatrix::Int4(q4_to_int4(data, rows, cols, false)?),
            GgmlType::Q4_1 => WeightMatrix::Int4(q4_to_int4(data, rows, cols, true)?),
            GgmlType::Q8_0 => WeightMatrix::Int8(q8_0_to_int8(data, rows, cols)?),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                WeightMatrix::Dense(DenseMatrix::new(rows, cols, self.tensor_f32(name)?)?)
            }
        })
    }
}
