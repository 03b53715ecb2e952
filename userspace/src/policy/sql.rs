//! Understanding SQL: PostgreSQL's own parser, statement by statement.
//!
//! We parse with `pg_query` (libpg_query: the parser source of PostgreSQL
//! itself) rather than a pure-Rust grammar such as `sqlparser`: a gateway
//! that judges a different parse tree from the one the server executes can
//! be bypassed through the difference (dollar quoting, nested comments,
//! Unicode escapes, `E''` strings, odd keywords). With the server's own
//! grammar, what we judge is what runs. Anything the parser rejects is
//! reported as [`SqlError::Unparseable`], which the engine blocks by default.
//!
//! Tables, columns and nested writes are collected by a generic walk over
//! the whole tree (via its serde form), not by a list of node types we
//! remembered to visit: a table hidden in an unusual clause is still seen.

use std::collections::BTreeSet;

use pg_query::protobuf::{self, node::Node as N, SelectStmt, SetOperation};
use serde_json::Value;

use super::request::{Operation, Operations};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SqlError {
    #[error("the gateway cannot parse this SQL ({0}); unparseable statements are blocked")]
    Unparseable(String),
}

/// One statement, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The statement's own text, trimmed.
    pub text: String,
    /// `SELECT`, `DELETE`, `DROP`, `CREATE TABLE`, `GRANT`, `COPY`, ...
    pub command: String,
    pub operations: Operations,
    /// Tables read or written, lower case, `schema.table` when qualified.
    pub tables: Vec<String>,
    /// Every column named anywhere, lower case; `*` for a star.
    pub columns: Vec<String>,
    /// WHERE on the top-level SELECT/UPDATE/DELETE; `None` for others.
    pub filtered: Option<bool>,
    /// LIMIT/FETCH on the top-level SELECT; `None` for others.
    pub limited: Option<bool>,
    /// A DELETE or UPDATE somewhere in the statement without WHERE.
    pub unfiltered_write: bool,
    /// What the result columns are made of, for column masking.
    pub outputs: Outputs,
    /// For `COPY ... TO`: what the copied columns are.
    pub copy_out: Option<CopyOut>,
}

/// The result columns of a statement, as far as the parse tree tells.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs {
    /// One entry per target (SELECT list or RETURNING list).
    pub targets: Vec<Output>,
    /// A `*` in the list: positions no longer line up with targets.
    pub star: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The column name the client will see, when the tree says it.
    pub name: Option<String>,
    /// Source columns the value is computed from.
    pub sources: Vec<String>,
}

/// The shape of a `COPY ... TO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOut {
    /// Column names in order, when the statement names them (`COPY t (a, b)`
    /// or `COPY (SELECT a, b ...)`); `None` for `COPY t TO` and `SELECT *`.
    pub columns: Option<Vec<Output>>,
    pub binary: bool,
}

/// Splits `sql` into statements and classifies each. `large_tables` are
/// tables whose unbounded reads count as [`Operation::Export`].
///
/// # Errors
/// [`SqlError::Unparseable`] if PostgreSQL's grammar rejects the text (or
/// the parser library fails in any way: it is caught, never a panic).
pub fn classify(sql: &str, large_tables: &[String]) -> Result<Vec<Statement>, SqlError> {
    let parsed = std::panic::catch_unwind(|| pg_query::parse(sql))
        .map_err(|_| SqlError::Unparseable("parser failure".into()))?
        .map_err(|e| SqlError::Unparseable(e.to_string()))?;
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        let text = statement_text(sql, raw.stmt_location, raw.stmt_len);
        out.push(classify_one(node, text, large_tables)?);
    }
    Ok(out)
}

fn statement_text(sql: &str, location: i32, len: i32) -> String {
    let start = usize::try_from(location).unwrap_or(0).min(sql.len());
    let end = match usize::try_from(len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(len) => start.saturating_add(len).min(sql.len()),
    };
    sql.get(start..end).unwrap_or(sql).trim().to_string()
}

fn classify_one(node: &N, text: String, large_tables: &[String]) -> Result<Statement, SqlError> {
    let tree = serde_json::to_value(node).map_err(|e| SqlError::Unparseable(e.to_string()))?;
    let (variant, _) = tree
        .as_object()
        .and_then(|o| o.iter().next())
        .ok_or_else(|| SqlError::Unparseable("empty statement".into()))?;
    let mut walk = Walk::default();
    walk.visit(&tree, 0);
    let mut operations = walk.operations;
    operations.insert(top_level_operation(node));
    let tables: Vec<String> = walk
        .tables
        .iter()
        .filter(|t| !walk.ctes.contains(*t))
        .cloned()
        .collect();

    let (filtered, limited, outputs) = match node {
        N::SelectStmt(s) => (
            Some(s.where_clause.is_some()),
            Some(s.limit_count.is_some()),
            select_outputs(s),
        ),
        N::UpdateStmt(s) => (
            Some(s.where_clause.is_some()),
            None,
            list_outputs(&s.returning_list),
        ),
        N::DeleteStmt(s) => (
            Some(s.where_clause.is_some()),
            None,
            list_outputs(&s.returning_list),
        ),
        N::InsertStmt(s) => (None, None, list_outputs(&s.returning_list)),
        _ => (None, None, Outputs::default()),
    };
    if matches!(node, N::SelectStmt(_)) && limited == Some(false) {
        let large = tables
            .iter()
            .any(|t| large_tables.iter().any(|l| same_table(l, t)));
        if large {
            operations.insert(Operation::Export);
        }
    }
    let copy_out = match node {
        N::CopyStmt(c) if !c.is_from => Some(copy_shape(c)),
        _ => None,
    };
    Ok(Statement {
        text,
        command: command_name(variant),
        operations,
        tables,
        columns: walk.columns.into_iter().collect(),
        filtered,
        limited,
        unfiltered_write: walk.unfiltered_write,
        outputs,
        copy_out,
    })
}

/// Whether a rule's table name (`users` or `public.users`) names `table`.
pub fn same_table(rule: &str, table: &str) -> bool {
    if rule == table {
        return true;
    }
    // An unqualified name on either side matches any schema: with
    // search_path, `users` may well be `public.users`, so fail closed.
    match (rule.rsplit_once('.'), table.rsplit_once('.')) {
        (None, Some((_, name))) => name == rule,
        (Some((_, name)), None) => name == table,
        _ => false,
    }
}

/// `DropStmt` -> `DROP`, `CreateTableAsStmt` -> `CREATE TABLE AS`.
fn command_name(variant: &str) -> String {
    let base = variant.strip_suffix("Stmt").unwrap_or(variant);
    let mut out = String::with_capacity(base.len() + 4);
    for (i, c) in base.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn top_level_operation(node: &N) -> Operation {
    match node {
        N::SelectStmt(s) if s.into_clause.is_some() => Operation::Ddl,
        N::SelectStmt(_)
        | N::VariableShowStmt(_)
        | N::ExplainStmt(_)
        | N::DeclareCursorStmt(_)
        | N::FetchStmt(_) => Operation::Read,
        N::InsertStmt(_)
        | N::UpdateStmt(_)
        | N::DeleteStmt(_)
        | N::MergeStmt(_)
        | N::DoStmt(_)
        | N::CallStmt(_)
        | N::LockStmt(_)
        | N::ExecuteStmt(_) => Operation::Write,
        N::CopyStmt(c) if c.is_from => Operation::Write,
        N::CopyStmt(_) => Operation::Export,
        N::GrantStmt(_)
        | N::GrantRoleStmt(_)
        | N::CreateRoleStmt(_)
        | N::AlterRoleStmt(_)
        | N::AlterRoleSetStmt(_)
        | N::DropRoleStmt(_)
        | N::AlterDefaultPrivilegesStmt(_)
        | N::ReassignOwnedStmt(_)
        | N::DropOwnedStmt(_)
        | N::CreatePolicyStmt(_)
        | N::AlterPolicyStmt(_)
        | N::CreateUserMappingStmt(_)
        | N::AlterUserMappingStmt(_) => Operation::Dcl,
        N::TransactionStmt(_)
        | N::VariableSetStmt(_)
        | N::DiscardStmt(_)
        | N::DeallocateStmt(_)
        | N::ClosePortalStmt(_)
        | N::ListenStmt(_)
        | N::UnlistenStmt(_)
        | N::NotifyStmt(_)
        | N::ConstraintsSetStmt(_)
        | N::PrepareStmt(_) => Operation::Session,
        // Everything else changes the schema or the server: the safe
        // default for a statement kind we did not list.
        _ => Operation::Ddl,
    }
}

fn select_outputs(s: &SelectStmt) -> Outputs {
    match SetOperation::try_from(s.op) {
        Ok(SetOperation::SetopNone) | Err(_) => list_outputs(&s.target_list),
        Ok(_) => {
            let left = s.larg.as_deref().map(select_outputs).unwrap_or_default();
            let right = s.rarg.as_deref().map(select_outputs).unwrap_or_default();
            let mut merged = left;
            merged.star |= right.star;
            for (l, r) in merged.targets.iter_mut().zip(right.targets) {
                l.sources.extend(r.sources);
            }
            merged
        }
    }
}

fn list_outputs(list: &[protobuf::Node]) -> Outputs {
    let mut outputs = Outputs::default();
    for item in list {
        let Some(N::ResTarget(target)) = &item.node else {
            continue;
        };
        let val = target.val.as_deref().and_then(|v| v.node.as_ref());
        let mut walk = Walk::default();
        if let Some(val) = val {
            if let Ok(tree) = serde_json::to_value(val) {
                walk.visit(&tree, 0);
            }
        }
        let star = walk.columns.contains("*") && matches!(val, Some(N::ColumnRef(_)));
        outputs.star |= star;
        let name = if !target.name.is_empty() {
            Some(target.name.to_lowercase())
        } else if let Some(N::ColumnRef(c)) = val {
            c.fields.last().and_then(|f| match &f.node {
                Some(N::String(s)) => Some(s.sval.to_lowercase()),
                _ => None,
            })
        } else {
            None
        };
        outputs.targets.push(Output {
            name,
            sources: walk.columns.into_iter().filter(|c| c != "*").collect(),
        });
    }
    outputs
}

fn copy_shape(c: &protobuf::CopyStmt) -> CopyOut {
    let binary = c.options.iter().any(|o| match &o.node {
        Some(N::DefElem(d)) => {
            d.defname.eq_ignore_ascii_case("format")
                && matches!(d.arg.as_deref().and_then(|a| a.node.as_ref()),
                    Some(N::String(s)) if s.sval.eq_ignore_ascii_case("binary"))
        }
        _ => false,
    });
    let columns = if let Some(N::SelectStmt(s)) = c.query.as_deref().and_then(|q| q.node.as_ref()) {
        let outputs = select_outputs(s);
        (!outputs.star).then_some(outputs.targets)
    } else if c.query.is_some() {
        // COPY (INSERT ... RETURNING ...) and friends: shape unknown.
        None
    } else if c.attlist.is_empty() {
        None
    } else {
        Some(
            c.attlist
                .iter()
                .filter_map(|a| match &a.node {
                    Some(N::String(s)) => Some(Output {
                        name: Some(s.sval.to_lowercase()),
                        sources: vec![s.sval.to_lowercase()],
                    }),
                    _ => None,
                })
                .collect(),
        )
    };
    CopyOut { columns, binary }
}

fn v_text<'a>(map: &'a serde_json::Map<String, Value>, key: &str) -> &'a str {
    map.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A generic walk over the serde form of a parse tree.
#[derive(Default)]
struct Walk {
    tables: BTreeSet<String>,
    ctes: BTreeSet<String>,
    columns: BTreeSet<String>,
    operations: Operations,
    unfiltered_write: bool,
}

impl Walk {
    fn visit(&mut self, value: &Value, depth: usize) {
        // prost already refuses trees deeper than 100 messages; this is a
        // second, local bound on our own recursion.
        if depth > 400 {
            return;
        }
        match value {
            Value::Array(items) => items.iter().for_each(|v| self.visit(v, depth + 1)),
            Value::Object(map) => {
                // RangeVars appear both as nodes and as typed fields (the
                // `relation` of INSERT, UPDATE, DELETE, COPY, ...), where
                // no "RangeVar" key wraps them: recognise them by shape.
                if map.contains_key("relname") && map.contains_key("relpersistence") {
                    self.range_var(v_text(map, "schemaname"), v_text(map, "relname"));
                }
                for (key, v) in map {
                    self.node(key, v);
                    self.visit(v, depth + 1);
                }
            }
            _ => {}
        }
    }

    fn range_var(&mut self, schema: &str, name: &str) {
        if !name.is_empty() {
            self.tables.insert(if schema.is_empty() {
                name.to_lowercase()
            } else {
                format!("{}.{}", schema.to_lowercase(), name.to_lowercase())
            });
        }
    }

    fn node(&mut self, key: &str, v: &Value) {
        let text = |field: &str| v.get(field).and_then(Value::as_str).unwrap_or("");
        match key {
            "DropStmt" => {
                // Dropped objects are name lists, not RangeVars.
                let objects = v.get("objects").and_then(Value::as_array);
                for object in objects.into_iter().flatten() {
                    let Some(items) = object.pointer("/node/List/items").and_then(Value::as_array)
                    else {
                        continue;
                    };
                    let names: Vec<&str> = items
                        .iter()
                        .filter_map(|i| i.pointer("/node/String/sval").and_then(Value::as_str))
                        .collect();
                    if let [schema @ .., name] = names.as_slice() {
                        self.range_var(schema.last().copied().unwrap_or(""), name);
                    }
                }
            }
            "CommonTableExpr" => {
                self.ctes.insert(text("ctename").to_lowercase());
            }
            "ColumnRef" => {
                let last = v
                    .get("fields")
                    .and_then(Value::as_array)
                    .and_then(|f| f.last());
                if let Some(last) = last {
                    if let Some(s) = last.pointer("/node/String/sval").and_then(Value::as_str) {
                        self.columns.insert(s.to_lowercase());
                    } else if last.pointer("/node/AStar").is_some() {
                        self.columns.insert("*".into());
                    }
                }
            }
            "SelectStmt" => {
                let from = v.get("from_clause").and_then(Value::as_array);
                if from.is_some_and(|f| !f.is_empty()) {
                    self.operations.insert(Operation::Read);
                }
            }
            "InsertStmt" | "MergeStmt" => self.operations.insert(Operation::Write),
            "UpdateStmt" | "DeleteStmt" => {
                self.operations.insert(Operation::Write);
                if v.get("where_clause").is_none_or(Value::is_null) {
                    self.unfiltered_write = true;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Random;

    /// What a client can send as a statement: anything.
    #[test]
    fn any_text_is_classified_or_refused_without_a_panic() {
        const STATEMENTS: &[&str] = &[
            "select * from t where a = 1 limit 5",
            "insert into x values ($1, 'a''b') returning id",
            "with a as (select 1) delete from t using a where t.id = a.id",
            "copy (select * from events) to stdout with (format csv)",
            "do $$ begin perform 1; end $$",
            "select $tag$ x $tag$, e'\\'', U&\"a\" from \"T\".\"u\"",
            "update t set a = (select max(b) from u) where c in (1, 2, 3)",
            "/* c */ -- x\n select 1; select 2;",
            "grant select on all tables in schema public to bob",
            "explain analyze select * from t join u on t.a = u.b order by 1",
        ];
        let mut random = Random::new(0x5151_7777_aaaa_3333);
        for _ in 0..20_000 {
            let statement = *random.pick(STATEMENTS);
            let text = random.mutate(statement);
            let _ = classify(&text, &["events".to_string()]);
        }
    }

    fn one(sql: &str) -> Statement {
        let mut all = classify(sql, &["events".to_string()]).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    fn ops(s: &Statement) -> Vec<&'static str> {
        s.operations.iter().map(Operation::name).collect()
    }

    #[test]
    fn classifies_reads_writes_ddl_dcl() {
        let s = one("SELECT name, email FROM public.Users u WHERE u.id = 1");
        assert_eq!(s.command, "SELECT");
        assert_eq!(ops(&s), ["read"]);
        assert_eq!(s.tables, ["public.users"]);
        assert_eq!(s.columns, ["email", "id", "name"]);
        assert_eq!(s.filtered, Some(true));
        assert_eq!(ops(&one("INSERT INTO t VALUES (1)")), ["write"]);
        assert_eq!(one("INSERT INTO s.t VALUES (1)").tables, ["s.t"]);
        assert_eq!(one("UPDATE t SET a = 1 WHERE b = 2").tables, ["t"]);
        assert_eq!(one("COPY t TO STDOUT").tables, ["t"]);
        assert_eq!(ops(&one("DROP TABLE t")), ["ddl"]);
        assert_eq!(one("DROP TABLE s.t, u").tables, ["s.t", "u"]);
        assert_eq!(one("DROP TABLE t").command, "DROP");
        assert_eq!(ops(&one("TRUNCATE t")), ["ddl"]);
        assert_eq!(ops(&one("GRANT SELECT ON t TO bob")), ["dcl"]);
        assert_eq!(ops(&one("BEGIN")), ["session"]);
        assert_eq!(one("CREATE TABLE x (a int)").command, "CREATE");
        assert_eq!(one("CREATE TABLE x AS SELECT 1").command, "CREATE TABLE AS");
    }

    #[test]
    fn unfiltered_writes_are_seen_even_when_nested() {
        let s = one("DELETE FROM t");
        assert!(s.unfiltered_write);
        assert_eq!(s.filtered, Some(false));
        assert!(!one("DELETE FROM t WHERE id = 1").unfiltered_write);
        assert!(one("UPDATE t SET a = 1").unfiltered_write);
        let s = one("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d");
        assert!(s.unfiltered_write);
        assert_eq!(ops(&s), ["read", "write"]);
        assert_eq!(s.tables, ["t"], "the CTE name is not a table");
        assert!(one("EXPLAIN ANALYZE DELETE FROM t").unfiltered_write);
    }

    #[test]
    fn exports() {
        let s = one("COPY users TO STDOUT");
        assert_eq!(ops(&s), ["export"]);
        assert_eq!(
            s.copy_out,
            Some(CopyOut {
                columns: None,
                binary: false
            })
        );
        let s = one("COPY (SELECT email AS e FROM users) TO STDOUT WITH (FORMAT binary)");
        let copy = s.copy_out.unwrap();
        assert!(copy.binary);
        assert_eq!(copy.columns.unwrap()[0].sources, ["email"]);
        assert_eq!(ops(&one("COPY users FROM STDIN")), ["write"]);
        assert_eq!(ops(&one("SELECT * FROM events")), ["read", "export"]);
        assert_eq!(ops(&one("SELECT * FROM events LIMIT 10")), ["read"]);
    }

    #[test]
    fn multi_statement_strings_are_split() {
        let all = classify("SELECT 1; DROP TABLE t ;", &[]).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].text, "SELECT 1");
        assert_eq!(all[1].text, "DROP TABLE t");
    }

    #[test]
    fn outputs_follow_aliases_and_positions() {
        let s = one("SELECT lower(email) AS e, id, 1 FROM users");
        assert!(!s.outputs.star);
        assert_eq!(s.outputs.targets[0].name.as_deref(), Some("e"));
        assert_eq!(s.outputs.targets[0].sources, ["email"]);
        assert_eq!(s.outputs.targets[1].name.as_deref(), Some("id"));
        assert!(s.outputs.targets[2].sources.is_empty());
        assert!(one("SELECT * FROM users").outputs.star);
        let s = one("SELECT a FROM x UNION SELECT email FROM users");
        assert_eq!(s.outputs.targets[0].sources, ["a", "email"]);
        let s = one("DELETE FROM users WHERE id = 1 RETURNING email");
        assert_eq!(s.outputs.targets[0].sources, ["email"]);
    }

    #[test]
    fn dollar_quotes_and_comments_parse_as_the_server_does() {
        // The DROP is inside a string: one harmless SELECT.
        let s = one("SELECT $x$; DROP TABLE t; $x$ /* ; DELETE FROM t */");
        assert_eq!(s.command, "SELECT");
        assert!(s.tables.is_empty());
    }

    #[test]
    fn garbage_is_unparseable() {
        assert!(matches!(
            classify("SELEC * FRM t", &[]),
            Err(SqlError::Unparseable(_))
        ));
        assert!(classify("", &[]).unwrap().is_empty());
    }

    #[test]
    fn table_names_match_with_or_without_schema() {
        assert!(same_table("users", "public.users"));
        assert!(same_table("public.users", "public.users"));
        assert!(!same_table("public.users", "other.users"));
        assert!(!same_table("users", "users_archive"));
        assert!(same_table("public.users", "users"));
    }
}
