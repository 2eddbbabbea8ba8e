// The fault matrix's columns from the transfer on: a fault while the task's state is on its way,
// being restored, committed, resumed there while the source still holds its frozen copy
// (pre-copy), or (post-copy) running on the destination with pages still to come.
import { faultMatrix } from '../support/fault-matrix.js';

faultMatrix(['transfer', 'restore', 'commit', 'resumed', 'postcopy'], 'g', 84);
