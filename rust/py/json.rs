//! Conversion between Python objects and `serde_json::Value`, so items given as
//! dicts get exactly the same canonical form as items given as JSON text.

use pyo3::exceptions::PySystemError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use serde_json::{Map, Number, Value};

use crate::item::{too_deep, MAX_DEPTH};

/// Why a Python value is not JSON (no content is echoed, only type names).
pub type NotJson = String;

/// Convert a Python value (dict with str keys, list, tuple, str, int, float, bool,
/// None) to JSON.
pub fn to_value(obj: &Bound<'_, PyAny>, depth: usize) -> Result<Value, NotJson> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return s
            .to_str()
            .map(|s| Value::String(s.to_owned()))
            .map_err(|_| "a string is not valid UTF-8 (lone surrogate)".to_owned());
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err("an integer does not fit in 64 bits".to_owned());
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Number::from_f64(f.value())
            .map(Value::Number)
            .ok_or_else(|| "a float is not finite (NaN or infinity)".to_owned());
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        // A list of its pairs, not the dict itself: PyO3's dict iterator panics when
        // the dict changes size meanwhile (a value's conversion may run Python code,
        // and other threads may run without the GIL on free-threaded builds).
        let mut map = Map::new();
        for pair in d.items().iter() {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = pair
                .extract()
                .map_err(|_| "a dict could not be read".to_owned())?;
            map.insert(key(&k)?, to_value(&v, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return l
            .iter()
            .map(|v| to_value(&v, depth + 1))
            .collect::<Result<_, _>>()
            .map(Value::Array);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return t
            .iter()
            .map(|v| to_value(&v, depth + 1))
            .collect::<Result<_, _>>()
            .map(Value::Array);
    }
    if let Ok(m) = obj.cast::<PyMapping>() {
        let mut map = Map::new();
        let items = m
            .items()
            .map_err(|_| "a mapping could not be read".to_owned())?;
        for pair in items.iter() {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = pair
                .extract()
                .map_err(|_| "a mapping could not be read".to_owned())?;
            map.insert(key(&k)?, to_value(&v, depth + 1)?);
        }
        return Ok(Value::Object(map));
    }
    let type_name = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_owned());
    Err(format!("a value of type '{type_name}' is not JSON"))
}

fn key(k: &Bound<'_, PyAny>) -> Result<String, NotJson> {
    match k.cast::<PyString>() {
        Ok(s) => s
            .to_str()
            .map(str::to_owned)
            .map_err(|_| "a key is not valid UTF-8 (lone surrogate)".to_owned()),
        Err(_) => Err("object keys must be strings".to_owned()),
    }
}

/// Convert JSON to Python objects (dicts, lists, str, int, float, bool, None).
pub fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(values) => {
            let list = PyList::empty(py);
            for v in values {
                list.append(to_py(py, v)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, v) in map {
                dict.set_item(k, to_py(py, v)?)?;
            }
            dict.into_any()
        }
    })
}

/// Parse one item's canonical JSON into Python objects.
pub fn item_to_py<'py>(py: Python<'py>, json: &[u8]) -> PyResult<Bound<'py, PyAny>> {
    let value: Value = serde_json::from_slice(json).map_err(|_| {
        PySystemError::new_err("internal error: a cached item could not be decoded")
    })?;
    to_py(py, &value)
}
