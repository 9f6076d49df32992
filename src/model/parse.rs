//! Strict reading of multi-document YAML into [`Object`]s.
//!
//! Each document is first read as a generic value and walked against the
//! OpenAPI schema of the CRD generated from the same types, so unknown fields,
//! wrong types and missing required fields are found by the one description
//! that also goes to Kubernetes. Offending parts are cut out (or replaced by
//! placeholders) so the remaining document can still be typed and checked by
//! the semantic rules: the operator sees every error of a file at once.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::{
    API_VERSION, Cluster, ClusterRoleBinding, DEFAULT_NAMESPACE, Kind, Object, RegistrySecret,
    Repository, RoleBinding, ValidationError, object_id, validate,
};

/// The outcome of reading a text: the objects that passed every check and the
/// errors of those that did not.
#[derive(Debug, Default)]
pub struct Checked {
    /// Objects that are fully valid, in document order.
    pub objects: Vec<Object>,
    /// Every error found, in document order.
    pub errors: Vec<ValidationError>,
}

/// Reads every document of a (multi-document) YAML or JSON text, strictly, and
/// returns the objects only if all of them are valid; otherwise every error.
pub fn parse_documents(text: &str) -> Result<Vec<Object>, Vec<ValidationError>> {
    let checked = check_documents(text);
    if checked.errors.is_empty() {
        Ok(checked.objects)
    } else {
        Err(checked.errors)
    }
}

/// Like [`parse_documents`], but keeps the valid objects next to the errors,
/// so `validate` can say which objects passed.
pub fn check_documents(text: &str) -> Checked {
    let mut out = Checked::default();
    // One spare document for the empty one after a trailing `---`, which is
    // not an object; objects are counted below.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! { max_documents: MAX_DOCUMENTS + 1 },
    };
    let docs: Vec<Value> =
        match serde_saphyr::from_str_multiple_with_options::<Value, Vec<Value>>(text, options) {
            Ok(docs) => docs,
            Err(e) => {
                out.errors
                    .push(ValidationError::new("input", "", yaml_error(&e)));
                return out;
            }
        };
    if docs.iter().filter(|d| !d.is_null()).count() > MAX_DOCUMENTS {
        out.errors
            .push(ValidationError::new("input", "", too_many_documents()));
        return out;
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let number = i + 1;
        // A document holding only comments (for example after a trailing `---`) is not an object.
        if doc.is_null() {
            continue;
        }
        match check_document(number, doc) {
            Ok(object) => {
                let id = object.id();
                if let Some(first) = seen.get(&id) {
                    out.errors.push(ValidationError::new(
                        id,
                        "",
                        format!(
                            "defined twice in one input (documents {first} and {number}); expected each object once"
                        ),
                    ));
                } else {
                    seen.insert(id, number);
                    out.objects.push(object);
                }
            }
            Err(errors) => out.errors.extend(errors),
        }
    }
    out
}

/// Most documents (objects) one file or input may hold. The YAML reader stops
/// at a limit so that a runaway file (a storm of `---`) cannot exhaust memory;
/// this is its default, named here so that the error can say it. Several files
/// can be given at once, so a larger fleet splits its objects across files.
pub(crate) const MAX_DOCUMENTS: usize = 1024;

const SPLIT: &str = "split it into several files and give each with -f, e.g. imgfleet apply -f part-1.yaml -f part-2.yaml";

fn too_many_documents() -> String {
    format!(
        "more than {MAX_DOCUMENTS} documents: one file holds at most {MAX_DOCUMENTS} objects (documents separated by ---); {SPLIT}"
    )
}

/// What went wrong reading the YAML, for an operator: a limit of the reader says
/// which limit and what to do; a syntax error keeps the parser's position and
/// snippet.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::budget::BudgetBreach;
    if let serde_saphyr::Error::Budget { breach, .. } = e.without_snippet() {
        let budget = serde_saphyr::Budget::default();
        return match breach {
            BudgetBreach::Documents { .. } => too_many_documents(),
            BudgetBreach::Nodes { .. } | BudgetBreach::Events { .. } => format!(
                "too large: one file holds at most {} YAML values (scalars, lists and mappings); {SPLIT}",
                budget.max_nodes
            ),
            BudgetBreach::ScalarBytes { .. } | BudgetBreach::InputBytes { .. } => format!(
                "too large: one file holds at most {} MiB of text; {SPLIT}",
                budget.max_total_scalar_bytes / (1024 * 1024)
            ),
            BudgetBreach::Depth { .. } => format!(
                "nested more than {} levels deep; imgfleet objects need far fewer: check the indentation",
                budget.max_depth
            ),
            _ => "too many anchors, aliases or merge keys for the YAML reader's safety limits: write the values out instead of referring to them".to_owned(),
        };
    }
    // The parser's text is written for developers; keep the position and the
    // snippet, drop the advice about parser options.
    let text = e.to_string();
    let text = text
        .strip_prefix("error: ")
        .unwrap_or(&text)
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    format!("not valid YAML: {text}")
}

/// Checks one document and types it.
fn check_document(number: usize, mut doc: Value) -> Result<Object, Vec<ValidationError>> {
    let label = format!("document {number}");
    let Value::Object(map) = &mut doc else {
        return Err(vec![ValidationError::new(
            label,
            "",
            format!(
                "not an imgfleet object: expected a mapping with apiVersion {API_VERSION} and kind RegistrySecret, Repository or Cluster, got {}",
                describe(&doc)
            ),
        )]);
    };

    let kind = check_header(&label, map)?;

    // Name the object as early as possible so every later message can use it.
    let meta = map.get("metadata").and_then(Value::as_object);
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_NAMESPACE);
    let id = if name.is_empty() {
        format!("{kind} ({label})")
    } else {
        object_id(kind, kind.namespaced().then_some(namespace), name)
    };

    if kind == Kind::Cluster && !map.contains_key("spec") {
        // A Cluster's spec is all optional; `spec:` left out means an empty one.
        map.insert("spec".to_owned(), Value::Object(Map::new()));
    }

    let mut walker = Walker {
        id: &id,
        errors: Vec::new(),
        poisoned: Vec::new(),
    };
    let schema = document_schema(kind);
    walker.check(&mut doc, schema, "");
    let Walker {
        errors: mut structural,
        poisoned,
        ..
    } = walker;

    if kind.namespaced()
        && let Some(Value::Object(meta)) = doc.get_mut("metadata")
        && !meta.contains_key("namespace")
    {
        meta.insert(
            "namespace".to_owned(),
            Value::String(DEFAULT_NAMESPACE.to_owned()),
        );
    }

    let typed = match kind {
        Kind::RegistrySecret => {
            serde_json::from_value::<RegistrySecret>(doc).map(Object::RegistrySecret)
        }
        Kind::Repository => serde_json::from_value::<Repository>(doc).map(Object::Repository),
        Kind::Cluster => serde_json::from_value::<Cluster>(doc).map(Object::Cluster),
        Kind::RoleBinding => serde_json::from_value::<RoleBinding>(doc).map(Object::RoleBinding),
        Kind::ClusterRoleBinding => {
            serde_json::from_value::<ClusterRoleBinding>(doc).map(Object::ClusterRoleBinding)
        }
    };
    let object = match typed {
        Ok(object) => object,
        Err(e) => {
            if structural.is_empty() {
                // The schema walk should have caught anything serde refuses; say
                // what serde said rather than nothing.
                structural.push(ValidationError::new(id, "", e.to_string()));
            }
            return Err(structural);
        }
    };

    // Semantic errors about a field that was cut out or replaced by a
    // placeholder (or about its parent or children) would only repeat the
    // structural error in a more confusing way.
    let semantic = validate::validate_object(&object)
        .into_iter()
        .filter(|e| !poisoned.iter().any(|p| related(&e.field, p)));
    structural.extend(semantic);
    if structural.is_empty() {
        Ok(object)
    } else {
        Err(structural)
    }
}

/// Checks `apiVersion` and `kind`, which decide everything else.
fn check_header(label: &str, map: &Map<String, Value>) -> Result<Kind, Vec<ValidationError>> {
    let mut errors = Vec::new();
    match map.get("apiVersion") {
        Some(Value::String(v)) if v == API_VERSION => {}
        Some(Value::String(v)) => errors.push(ValidationError::new(
            label,
            "apiVersion",
            format!(
                "{}: expected {API_VERSION}; not an imgfleet object",
                validate::shown(v)
            ),
        )),
        Some(other) => errors.push(ValidationError::new(
            label,
            "apiVersion",
            format!("expected the string {API_VERSION}, got {}", describe(other)),
        )),
        None => errors.push(ValidationError::new(
            label,
            "apiVersion",
            format!("required field is missing; expected {API_VERSION}"),
        )),
    }
    let names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    let kind = match map.get("kind") {
        Some(Value::String(k)) => match Kind::from_kind_field(k) {
            Some(kind) => Some(kind),
            None => {
                errors.push(ValidationError::new(
                    label,
                    "kind",
                    format!(
                        "{}: expected one of RegistrySecret, Repository, Cluster{}",
                        validate::shown(k),
                        hint(k, names.iter().copied())
                    ),
                ));
                None
            }
        },
        Some(other) => {
            errors.push(ValidationError::new(
                label,
                "kind",
                format!(
                    "expected one of RegistrySecret, Repository, Cluster, got {}",
                    describe(other)
                ),
            ));
            None
        }
        None => {
            errors.push(ValidationError::new(
                label,
                "kind",
                "required field is missing; expected RegistrySecret, Repository or Cluster",
            ));
            None
        }
    };
    match kind {
        Some(kind) if errors.is_empty() => Ok(kind),
        _ => Err(errors),
    }
}

/// The schema of a whole document of `kind`: the CRD's OpenAPI schema (which
/// describes spec and status) plus apiVersion, kind and the metadata fields
/// imgfleet accepts.
fn document_schema(kind: Kind) -> &'static Value {
    use std::sync::OnceLock;
    static SCHEMAS: OnceLock<[Value; 5]> = OnceLock::new();
    let all = SCHEMAS.get_or_init(|| Kind::ALL.map(build_document_schema));
    match kind {
        Kind::RegistrySecret => &all[0],
        Kind::Repository => &all[1],
        Kind::Cluster => &all[2],
        Kind::RoleBinding => &all[3],
        Kind::ClusterRoleBinding => &all[4],
    }
}

fn build_document_schema(kind: Kind) -> Value {
    let mut schema = crate::crd::open_api_schema(kind);
    let metadata = serde_json::json!({
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            "resourceVersion": {"type": "string"},
            "generation": {"type": "integer", "format": "int64"},
            "uid": {"type": "string"},
            "creationTimestamp": {"type": "string", "format": "date-time"},
        }
    });
    if let Some(root) = schema.as_object_mut() {
        let props = root
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(props) = props.as_object_mut() {
            props.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
            props.insert("kind".into(), serde_json::json!({"type": "string"}));
            props.insert("metadata".into(), metadata);
        }
        root.insert(
            "required".into(),
            serde_json::json!(["apiVersion", "kind", "metadata", "spec"]),
        );
        root.insert("type".into(), Value::String("object".into()));
    }
    schema
}

/// Walks a value against an OpenAPI schema, collecting errors and cutting out
/// what does not fit.
struct Walker<'a> {
    id: &'a str,
    errors: Vec<ValidationError>,
    /// Paths cut out or replaced by placeholders.
    poisoned: Vec<String>,
}

impl Walker<'_> {
    fn error(&mut self, field: &str, mut message: String) {
        // Whatever was written as a password is never echoed, not even when it
        // has the wrong type; keep only what was expected.
        if field.ends_with("password") && field.starts_with("spec.") {
            message = message.split(", got").next().unwrap_or_default().to_owned();
        }
        self.errors
            .push(ValidationError::new(self.id, field, message));
    }

    /// Returns false when the value does not fit and must be cut out.
    fn check(&mut self, value: &mut Value, schema: &Value, path: &str) -> bool {
        if value.is_null() && schema.get("nullable").and_then(Value::as_bool) == Some(true) {
            return true;
        }
        let ty = schema.get("type").and_then(Value::as_str);
        match ty {
            Some("object") => self.check_object(value, schema, path),
            Some("array") => self.check_array(value, schema, path),
            Some("string") => self.check_string(value, schema, path),
            Some("integer") => self.check_integer(value, schema, path),
            Some("boolean") => {
                if value.is_boolean() {
                    true
                } else {
                    self.error(
                        path,
                        format!("expected true or false, got {}", describe(value)),
                    );
                    false
                }
            }
            _ => {
                if let Some(allowed) = enum_values(schema) {
                    return self.check(
                        value,
                        &serde_json::json!({"type": "string", "enum": allowed}),
                        path,
                    );
                }
                true
            }
        }
    }

    /// A list: items that do not fit are cut out, the list itself stays.
    fn check_array(&mut self, value: &mut Value, schema: &Value, path: &str) -> bool {
        let Value::Array(items) = value else {
            self.error(path, format!("expected a list, got {}", describe(value)));
            return false;
        };
        let Some(item_schema) = schema.get("items") else {
            return true;
        };
        let mut keep = Vec::with_capacity(items.len());
        for (index, mut item) in std::mem::take(items).into_iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            if self.check(&mut item, item_schema, &item_path) {
                keep.push(item);
            } else {
                self.poisoned.push(item_path);
            }
        }
        *items = keep;
        true
    }

    /// A string, of an enum when the schema lists its values, or an RFC 3339 time.
    fn check_string(&mut self, value: &mut Value, schema: &Value, path: &str) -> bool {
        let Value::String(s) = value else {
            self.error(path, format!("expected a string, got {}", describe(value)));
            return false;
        };
        if let Some(allowed) = enum_values(schema)
            && !allowed.iter().any(|a| a == s)
        {
            let list = allowed.join(", ");
            let hint = hint(s, allowed.iter().map(String::as_str));
            self.error(
                path,
                format!("{}: expected one of {list}{hint}", validate::shown(s)),
            );
            return false;
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time")
            && s.parse::<k8s_openapi::jiff::Timestamp>().is_err()
        {
            self.error(
                path,
                format!(
                    "{}: expected an RFC 3339 time like 2026-01-08T10:00:00Z",
                    validate::shown(s)
                ),
            );
            return false;
        }
        true
    }

    /// An integer within the range its schema's format allows.
    fn check_integer(&mut self, value: &mut Value, schema: &Value, path: &str) -> bool {
        let (min, max) = integer_range(schema);
        let in_range = match value {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Some(i128::from(i))
                } else {
                    n.as_u64().map(i128::from)
                }
            }
            _ => None,
        };
        match in_range {
            Some(i) if i >= min && i <= max => true,
            Some(i) => {
                self.error(
                    path,
                    format!("{i} is out of range: expected an integer from {min} to {max}"),
                );
                false
            }
            None => {
                self.error(
                    path,
                    format!("expected an integer, got {}", describe(value)),
                );
                false
            }
        }
    }

    /// Checks the entry `key` of `map` against `schema`, and cuts it out if it does not fit.
    fn check_entry(
        &mut self,
        map: &mut Map<String, Value>,
        key: &str,
        schema: &Value,
        field: String,
    ) {
        let fits = match map.get_mut(key) {
            Some(v) => self.check(v, schema, &field),
            None => true,
        };
        if !fits {
            map.remove(key);
            self.poisoned.push(field);
        }
    }

    fn check_object(&mut self, value: &mut Value, schema: &Value, path: &str) -> bool {
        let Value::Object(map) = value else {
            self.error(path, format!("expected a mapping, got {}", describe(value)));
            return false;
        };
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let field = join(path, &key);
                match props.get(&key) {
                    Some(sub) => self.check_entry(map, &key, sub, field),
                    None => {
                        let hint = hint(&key, props.keys().map(String::as_str));
                        let message = if hint.is_empty() {
                            let known: Vec<&str> = props.keys().map(String::as_str).collect();
                            format!("unknown field; expected one of {}", known.join(", "))
                        } else {
                            format!("unknown field{hint}")
                        };
                        self.error(&field, message);
                        map.remove(&key);
                    }
                }
            }
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for key in required {
                if map.contains_key(key) {
                    continue;
                }
                let field = join(path, key);
                // A field cut out for its type already has its error.
                if !self.poisoned.contains(&field) {
                    self.error(&field, "required field is missing".to_owned());
                    self.poisoned.push(field);
                }
                if let Some(sub) = props.get(key) {
                    map.insert(key.to_owned(), placeholder(sub));
                }
            }
        } else if let Some(sub) = schema.get("additionalProperties").filter(|s| s.is_object()) {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let field = join(path, &key);
                self.check_entry(map, &key, sub, field);
            }
        }
        true
    }
}

/// A value of the schema's type that lets typing go on after a required field
/// was missing; errors about it are filtered out.
fn placeholder(schema: &Value) -> Value {
    if let Some(first) = enum_values(schema).and_then(|v| v.into_iter().next()) {
        return Value::String(first);
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let mut map = Map::new();
            if let (Some(required), Some(props)) = (
                schema.get("required").and_then(Value::as_array),
                schema.get("properties").and_then(Value::as_object),
            ) {
                for key in required.iter().filter_map(Value::as_str) {
                    if let Some(sub) = props.get(key) {
                        map.insert(key.to_owned(), placeholder(sub));
                    }
                }
            }
            Value::Object(map)
        }
        Some("array") => Value::Array(Vec::new()),
        Some("integer") => Value::from(integer_range(schema).0.max(0) as i64),
        Some("boolean") => Value::Bool(false),
        _ => Value::String(String::new()),
    }
}

/// The allowed strings of an enum schema, whether written as `enum` or as a
/// `oneOf` of `const`/`enum` alternatives (what schemars makes of documented variants).
fn enum_values(schema: &Value) -> Option<Vec<String>> {
    if let Some(list) = schema.get("enum").and_then(Value::as_array) {
        return Some(
            list.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        );
    }
    let alternatives = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)?;
    let mut out = Vec::new();
    for alt in alternatives {
        if let Some(c) = alt.get("const").and_then(Value::as_str) {
            out.push(c.to_owned());
        } else if let Some(list) = alt.get("enum").and_then(Value::as_array) {
            out.extend(list.iter().filter_map(Value::as_str).map(str::to_owned));
        } else {
            return None;
        }
    }
    Some(out)
}

fn integer_range(schema: &Value) -> (i128, i128) {
    let (mut min, mut max) = match schema.get("format").and_then(Value::as_str) {
        Some("uint32") => (0, i128::from(u32::MAX)),
        Some("uint64") => (0, i128::from(u64::MAX)),
        Some("int32") => (i128::from(i32::MIN), i128::from(i32::MAX)),
        Some("uint8") => (0, 255),
        Some("uint16") => (0, 65535),
        _ => (i128::from(i64::MIN), i128::from(i64::MAX)),
    };
    if let Some(m) = schema.get("minimum").and_then(Value::as_f64) {
        min = min.max(m as i128);
    }
    if let Some(m) = schema.get("maximum").and_then(Value::as_f64) {
        max = max.min(m as i128);
    }
    (min, max)
}

fn join(path: &str, key: &str) -> String {
    // A field path names a key; a key too long to be a field name is cut short.
    const KEEP: usize = 64;
    let short;
    let key = if key.len() > KEEP {
        let mut end = KEEP;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        short = format!("{}...", &key[..end]);
        short.as_str()
    } else {
        key
    };
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Whether an error about `field` concerns the poisoned path `p`: the same
/// field, one inside it, or one containing it.
fn related(field: &str, p: &str) -> bool {
    let inside = |a: &str, b: &str| {
        a == b || (a.starts_with(b) && matches!(a.as_bytes().get(b.len()), Some(b'.' | b'[')))
    };
    inside(field, p) || inside(p, field) || field.is_empty()
}

/// A short description of a value's type, for "expected X, got Y".
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {}", validate::shown(s)),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

/// `, did you mean X?` when one candidate is close to `given`, else empty.
pub(crate) fn hint<'a>(given: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    let given_lower = given.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    let mut seen = BTreeSet::new();
    for c in candidates {
        if !seen.insert(c) {
            continue;
        }
        let d = if c.to_ascii_lowercase() == given_lower {
            0
        } else {
            edit_distance(&given_lower, &c.to_ascii_lowercase())
        };
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    match best {
        // Allow about one typo per four characters, at least two.
        Some((d, c)) if d <= (given.len() / 4).max(2) => format!(", did you mean {c}?"),
        _ => String::new(),
    }
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_pick_the_closest_name() {
        let fields = ["repository", "tag", "syncInterval", "registryRef"];
        assert_eq!(
            hint("syncIntervall", fields.iter().copied()),
            ", did you mean syncInterval?"
        );
        assert_eq!(
            hint("regstryRef", fields.iter().copied()),
            ", did you mean registryRef?"
        );
        assert_eq!(hint("completelydifferent", fields.iter().copied()), "");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
