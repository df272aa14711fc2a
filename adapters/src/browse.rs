//! OPC UA discovery for `ferrotwin import opcua`: browses a server's Objects folder (forward
//! hierarchical references, objects and variables, namespace 0 left out: the server's own
//! diagnostics) and reads of every variable what a twin needs: data type, value rank, access
//! level, and its `EURange` and `EngineeringUnits` properties.
//!
//! Bounded: at most `BrowseLimits::max_nodes` nodes and `max_depth` levels below Objects; what
//! was cut is said in `Browsed::notes`, never silently.

use std::collections::HashSet;
use std::time::Duration;

use ferrotwin_models::ValueType;
use opcua::types::{
    AttributeId, BrowseDescription, BrowseDirection, BrowseResultMaskFlags, DataTypeId,
    EUInformation, NodeClass, NodeClassMask, NodeId, ObjectId, Range, ReadValueId,
    ReferenceDescription, ReferenceTypeId, TimestampsToReturn, Variant,
};

use crate::opcua::{OpcUaConfig, open_session};

/// How far a browse goes.
#[derive(Debug, Clone, Copy)]
pub struct BrowseLimits {
    /// Nodes (objects and variables) taken at most; the rest is named in the notes.
    pub max_nodes: usize,
    /// Levels below the Objects folder.
    pub max_depth: usize,
}

impl Default for BrowseLimits {
    fn default() -> Self {
        BrowseLimits {
            max_nodes: 20_000,
            max_depth: 12,
        }
    }
}

/// An object of the server's address space that holds variables (or the Objects folder
/// itself, `path` empty, when variables sit there).
#[derive(Debug, Clone, PartialEq)]
pub struct UaObject {
    /// Display names from below the Objects folder down to this object, this one last.
    pub path: Vec<String>,
    pub variables: Vec<UaVariable>,
}

/// A variable of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct UaVariable {
    /// As our config writes it: `ns=3;s=Hall2.PressA.OilTemp`.
    pub node_id: String,
    /// Its display name (browse name when it has none).
    pub name: String,
    /// `None`: a type a twin cannot hold (text, dates, structures) or an array; see `kind`.
    pub value_type: Option<ValueType>,
    /// The server's data type as a name (`Double`, `String`, `i=884`), and `[]` for arrays.
    pub kind: String,
    /// The current user may write it (AccessLevel and UserAccessLevel CurrentWrite).
    pub writable: bool,
    /// `EngineeringUnits`' display name (`°C`, `bar`).
    pub unit: Option<String>,
    /// `EURange` (low, high).
    pub range: Option<(f64, f64)>,
}

/// What a browse found.
#[derive(Debug, Clone, Default)]
pub struct Browsed {
    pub objects: Vec<UaObject>,
    /// What was left out and why (limits, unreadable nodes).
    pub notes: Vec<String>,
}

/// Browse descriptions per request and nodes per read (servers cap both; these are low).
const CHUNK: usize = 100;

/// Connects with `config` (its endpoint, security and user; its tags are ignored) and
/// browses the address space.
pub async fn browse(config: &OpcUaConfig, limits: BrowseLimits) -> Result<Browsed, String> {
    let (session, event_loop) = open_session(config).await?;
    let driver = event_loop.spawn();
    let timeout = Duration::from_millis(config.timeout_ms.max(1000));
    let up = tokio::time::timeout(timeout, session.wait_for_connection()).await;
    if !matches!(up, Ok(true)) {
        driver.abort();
        return Err(format!(
            "{}: the session did not come up within {} ms",
            config.endpoint,
            timeout.as_millis()
        ));
    }
    let result = walk(&session, limits).await;
    let _ = tokio::time::timeout(timeout, session.disconnect()).await;
    driver.abort();
    result.map_err(|e| format!("{}: {e}", config.endpoint))
}

/// One object or variable met while walking, before its attributes are read.
struct Found {
    node: NodeId,
    name: String,
    /// Index of the object (in `objects`) it belongs to.
    owner: usize,
}

async fn walk(session: &opcua::client::Session, limits: BrowseLimits) -> Result<Browsed, String> {
    let mut out = Browsed::default();
    let mut objects: Vec<UaObject> = vec![UaObject {
        path: Vec::new(),
        variables: Vec::new(),
    }];
    let mut seen: HashSet<NodeId> = HashSet::new();
    // (node, index of its object in `objects`) per level.
    let mut level: Vec<(NodeId, usize)> = vec![(ObjectId::ObjectsFolder.into(), 0)];
    let mut variables: Vec<Found> = Vec::new();
    let mut taken = 0usize;
    let mut cut = false;
    for depth in 0..=limits.max_depth {
        if level.is_empty() {
            break;
        }
        if depth == limits.max_depth {
            out.notes.push(format!(
                "{} object(s) at depth {} were not browsed (max depth)",
                level.len(),
                limits.max_depth
            ));
            break;
        }
        let mut next = Vec::new();
        for chunk in level.chunks(CHUNK) {
            let nodes: Vec<NodeId> = chunk.iter().map(|(n, _)| n.clone()).collect();
            let refs = browse_all(
                session,
                &nodes,
                ReferenceTypeId::HierarchicalReferences,
                NodeClassMask::OBJECT | NodeClassMask::VARIABLE,
            )
            .await?;
            for ((_, owner), refs) in chunk.iter().zip(refs) {
                for r in refs {
                    if r.node_id.server_index != 0 || r.node_id.node_id.namespace == 0 {
                        continue;
                    }
                    let node = r.node_id.node_id.clone();
                    if !seen.insert(node.clone()) {
                        continue;
                    }
                    if taken >= limits.max_nodes {
                        cut = true;
                        continue;
                    }
                    taken += 1;
                    let name = name_of(&r);
                    match r.node_class {
                        NodeClass::Object => {
                            let mut path = objects[*owner].path.clone();
                            path.push(name);
                            objects.push(UaObject {
                                path,
                                variables: Vec::new(),
                            });
                            next.push((node, objects.len() - 1));
                        }
                        NodeClass::Variable => variables.push(Found {
                            node,
                            name,
                            owner: *owner,
                        }),
                        _ => {}
                    }
                }
            }
        }
        level = next;
    }
    if cut {
        out.notes.push(format!(
            "the server has more than {} objects and variables: the rest was not browsed",
            limits.max_nodes
        ));
    }
    for chunk in variables.chunks(CHUNK) {
        let vars = describe(session, chunk).await?;
        for (f, v) in chunk.iter().zip(vars) {
            objects[f.owner].variables.push(v);
        }
    }
    out.objects = objects
        .into_iter()
        .filter(|o| !o.variables.is_empty())
        .collect();
    Ok(out)
}

fn name_of(r: &ReferenceDescription) -> String {
    let display = r.display_name.text.as_ref();
    if display.trim().is_empty() {
        r.browse_name.name.as_ref().to_string()
    } else {
        display.to_string()
    }
}

/// The references of each of `nodes` (forward, `reference` and its subtypes, of the
/// classes in `mask`), following continuation points.
async fn browse_all(
    session: &opcua::client::Session,
    nodes: &[NodeId],
    reference: ReferenceTypeId,
    mask: NodeClassMask,
) -> Result<Vec<Vec<ReferenceDescription>>, String> {
    let descriptions: Vec<BrowseDescription> = nodes
        .iter()
        .map(|n| BrowseDescription {
            node_id: n.clone(),
            browse_direction: BrowseDirection::Forward,
            reference_type_id: reference.into(),
            include_subtypes: true,
            node_class_mask: mask.bits(),
            result_mask: BrowseResultMaskFlags::all().bits(),
        })
        .collect();
    let results = session
        .browse(&descriptions, 1000, None)
        .await
        .map_err(|e| format!("browse refused: {e}"))?;
    let mut out = Vec::with_capacity(nodes.len());
    for r in results {
        let mut refs = r.references.unwrap_or_default();
        let mut point = r.continuation_point;
        // A continuation chain is bounded like the rest: at most 100 more pages per node.
        for _ in 0..100 {
            if point.is_null() || point.as_ref().is_empty() {
                break;
            }
            let more = session
                .browse_next(false, std::slice::from_ref(&point))
                .await
                .map_err(|e| format!("browse next refused: {e}"))?;
            let Some(m) = more.into_iter().next() else {
                break;
            };
            refs.extend(m.references.unwrap_or_default());
            point = m.continuation_point;
        }
        out.push(refs);
    }
    Ok(out)
}

/// Reads of each found variable its data type, value rank, access levels and its
/// `EURange`/`EngineeringUnits` properties.
async fn describe(
    session: &opcua::client::Session,
    found: &[Found],
) -> Result<Vec<UaVariable>, String> {
    const ATTRS: [AttributeId; 4] = [
        AttributeId::DataType,
        AttributeId::ValueRank,
        AttributeId::AccessLevel,
        AttributeId::UserAccessLevel,
    ];
    let reads: Vec<ReadValueId> = found
        .iter()
        .flat_map(|f| {
            ATTRS.iter().map(|a| ReadValueId {
                node_id: f.node.clone(),
                attribute_id: *a as u32,
                ..Default::default()
            })
        })
        .collect();
    let values = session
        .read(&reads, TimestampsToReturn::Neither, 0.0)
        .await
        .map_err(|e| format!("read of variable attributes refused: {e}"))?;
    // Properties: EURange and EngineeringUnits by browse name.
    let nodes: Vec<NodeId> = found.iter().map(|f| f.node.clone()).collect();
    let props = browse_all(
        session,
        &nodes,
        ReferenceTypeId::HasProperty,
        NodeClassMask::VARIABLE,
    )
    .await?;
    let mut prop_reads = Vec::new();
    let mut prop_of = Vec::new(); // (variable index, is_range)
    for (i, refs) in props.iter().enumerate() {
        for r in refs {
            let name = r.browse_name.name.as_ref();
            let is_range = match name {
                "EURange" => true,
                "EngineeringUnits" => false,
                _ => continue,
            };
            prop_reads.push(ReadValueId {
                node_id: r.node_id.node_id.clone(),
                attribute_id: AttributeId::Value as u32,
                ..Default::default()
            });
            prop_of.push((i, is_range));
        }
    }
    let prop_values = if prop_reads.is_empty() {
        Vec::new()
    } else {
        session
            .read(&prop_reads, TimestampsToReturn::Neither, 0.0)
            .await
            .map_err(|e| format!("read of EURange/EngineeringUnits refused: {e}"))?
    };
    let mut out: Vec<UaVariable> = found
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let attr = |k: usize| {
                values
                    .get(i * ATTRS.len() + k)
                    .and_then(|d| d.value.clone())
            };
            let data_type = match attr(0) {
                Some(Variant::NodeId(n)) => Some(*n),
                _ => None,
            };
            let array = matches!(attr(1), Some(Variant::Int32(r)) if r >= 0);
            // Bit 1 of AccessLevel and UserAccessLevel: CurrentWrite.
            let write = |v: Option<Variant>| matches!(v, Some(Variant::Byte(b)) if b & 2 != 0);
            let (value_type, kind) = type_of(data_type.as_ref(), array);
            UaVariable {
                node_id: f.node.to_string(),
                name: f.name.clone(),
                value_type,
                kind,
                writable: write(attr(2)) && write(attr(3)),
                unit: None,
                range: None,
            }
        })
        .collect();
    for ((i, is_range), dv) in prop_of.into_iter().zip(prop_values) {
        let Some(Variant::ExtensionObject(ext)) = dv.value else {
            continue;
        };
        if is_range {
            if let Some(r) = ext.inner_as::<Range>()
                && r.low.is_finite()
                && r.high.is_finite()
                && r.low < r.high
            {
                out[i].range = Some((r.low, r.high));
            }
        } else if let Some(eu) = ext.inner_as::<EUInformation>() {
            let text = eu.display_name.text.as_ref().trim();
            if !text.is_empty() {
                out[i].unit = Some(text.to_string());
            }
        }
    }
    Ok(out)
}

/// Our value type for an OPC UA data type, and the type's name for the notes.
fn type_of(data_type: Option<&NodeId>, array: bool) -> (Option<ValueType>, String) {
    let Some(dt) = data_type else {
        return (None, "unknown".into());
    };
    let id = dt.as_data_type_id().ok();
    let vt = match id {
        Some(DataTypeId::Boolean) => Some(ValueType::Bool),
        Some(
            DataTypeId::SByte
            | DataTypeId::Byte
            | DataTypeId::Int16
            | DataTypeId::UInt16
            | DataTypeId::Int32
            | DataTypeId::UInt32
            | DataTypeId::Int64
            | DataTypeId::UInt64
            | DataTypeId::Integer
            | DataTypeId::UInteger,
        ) => Some(ValueType::Int),
        Some(
            DataTypeId::Float | DataTypeId::Double | DataTypeId::Duration | DataTypeId::Number,
        ) => Some(ValueType::Float),
        _ => None,
    };
    let name = match id {
        Some(id) => format!("{id:?}"),
        None => dt.to_string(),
    };
    if array {
        (None, format!("{name}[]"))
    } else {
        (vt, name)
    }
}
