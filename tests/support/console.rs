//! Reading the admin console's answers in tests.

use std::collections::HashMap;

use tokio_postgres::{Client, SimpleQueryMessage};

/// A console answer: its column names and its rows as name -> value.
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<HashMap<String, String>>,
}

impl Table {
    pub fn row(&self, key: &str, value: &str) -> &HashMap<String, String> {
        self.rows
            .iter()
            .find(|r| r[key] == value)
            .unwrap_or_else(|| panic!("no row with {key} = {value} in {:?}", self.rows))
    }

    pub fn number(&self, key: &str, value: &str, column: &str) -> i64 {
        self.row(key, value)[column].parse().expect("a number")
    }
}

pub async fn show(client: &Client, command: &str) -> Table {
    let messages = client.simple_query(command).await.unwrap_or_else(|e| panic!("{command}: {e:?}"));
    let mut table = Table { columns: Vec::new(), rows: Vec::new() };
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                table.columns = columns.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                let values = row
                    .columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_string(), row.get(i).unwrap_or("").to_string()))
                    .collect();
                table.rows.push(values);
            }
            _ => {}
        }
    }
    table
}
